/* The cooperative agent (placeholder until the agent lands). */
