"""Block storage: O_DIRECT devices, aligned buffers and the asynchronous I/O engines."""
