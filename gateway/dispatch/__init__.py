"""Handing work to the task workers, by task name: the mail path's stages never import the task module
(gateway/tasks.py), which imports them all. `enqueue` sends a task after the transaction that made it
due commits; `scans` sends the SMTP server's scan tasks straight to Redis from its event loop."""
