"""The one-shot device suite (run.py) and the preparation of what it carries (prepare.py); see README.md."""
