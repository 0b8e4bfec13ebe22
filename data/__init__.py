"""rayft data."""
