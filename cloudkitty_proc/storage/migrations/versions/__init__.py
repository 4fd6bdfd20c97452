"""Migration scripts (a package so that they ship with cloudkitty_proc)."""
