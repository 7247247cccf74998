"""Reference solutions of the labs' "Your turn" exercises (imported by tests only)."""
