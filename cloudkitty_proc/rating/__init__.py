"""Rating processor plugins (stevedore namespace ``cloudkitty_proc.rating``)."""
