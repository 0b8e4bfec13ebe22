"""rayft trainers."""
