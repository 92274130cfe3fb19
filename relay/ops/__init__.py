"""Operations: metrics, systemd notification, logging, the configuration dump."""
