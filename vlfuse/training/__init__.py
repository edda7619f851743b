"""Training loops. Import-light: task modules are imported when a task is trained."""
