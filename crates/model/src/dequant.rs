//! GGML block formats (in progress).
