"""Tasks: each one a network (``model.py``: nn.Module + typed config), a user-facing pipeline (``pipeline.py``:
``from_pretrained`` / ``save_pretrained`` / ``__call__``) and its task-specific strategies."""
