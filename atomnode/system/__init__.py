"""System glue: configuration and its validation, value parsers, logging, systemd."""
