"""The storage manager: per-agent versioned files in content-addressed blobs."""
