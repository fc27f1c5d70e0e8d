"""The operator side: command-line commands, the blocking client, AtoM site reading, doctor."""
