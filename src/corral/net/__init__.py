"""Host networking for guests: tap devices (created, configured and attached for the user)."""
