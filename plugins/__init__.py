"""The built-in guards, installed as ``stabguard.plugins`` and loaded like any third-party plugin."""
