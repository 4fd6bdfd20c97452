"""Sphinx configuration for the cloudkitty-proc documentation."""

project = "cloudkitty-proc"
copyright = "2026, cloudkitty_proc developers"
extensions = ["oslo_config.sphinxext"]
master_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
