"""The pure control core: the orchestrator's decision loop as a state machine."""
