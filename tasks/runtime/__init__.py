"""Small helpers every stage may use: device choice, mixed precision, settings hashes, backbone weights."""
