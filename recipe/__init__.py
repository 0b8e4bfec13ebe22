"""The recipe: the schema of every key, loading YAML plus overrides, the rules, derived values and the plan's
types. The driver (`orchestrator/`) and the workers (`trainers/`, `data/`, `cluster/`) import it; it imports
neither."""
