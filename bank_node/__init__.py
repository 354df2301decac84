"""A bank's node: validation gate, local training, local evaluation, scoring, the agent."""
