"""The Gearman core: sans-I/O codec and broker, the I/O server, the text admin protocol."""
