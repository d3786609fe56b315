"""The export stage (stage.py: write, reload, check, decode) and the serving formats (formats/)."""
