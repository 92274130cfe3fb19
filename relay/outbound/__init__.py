"""Delivery to the upstream smarthosts: settings, connection pools, shaping, the delivery loop."""
