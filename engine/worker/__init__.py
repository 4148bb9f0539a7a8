"""The data plane: everything on the device (model, caches and states, input buffers)."""
