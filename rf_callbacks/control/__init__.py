"""Local control channel: a Unix-domain socket server inside the training process, and its client."""
