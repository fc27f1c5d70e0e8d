from typing import Any

def decode(buf: bytes | bytearray, pos: int, limit: int, table: bytes, magic: int,
           max_size: int, packet_type: type, request: bool) -> tuple[list[Any], int]: ...
