"""The stream API (client side and task side): write, read, seal, destroy."""
