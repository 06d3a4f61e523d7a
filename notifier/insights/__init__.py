"""What the service's own records tell merchants: notification analytics (``counts``)."""
