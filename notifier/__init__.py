"""notifier: turns shipment status transitions into the customer messages that matter."""

__version__ = "0.5.0"
