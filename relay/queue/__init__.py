"""The spool where accepted mail waits, bounces, and the control socket that manages the queue."""
