"""What happened to each message, told to the apps: events, sinks, suppression, history."""
