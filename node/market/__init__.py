"""The market: offers, routing, the job protocol (worker and requester sides), activity."""
