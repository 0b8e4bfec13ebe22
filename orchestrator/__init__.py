"""rayft orchestrator."""
