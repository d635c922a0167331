"""Package data: the templates ``stabguard new-plugin`` renders."""
