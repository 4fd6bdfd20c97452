"""Collector plugins (stevedore namespace ``cloudkitty_proc.collectors``)."""
