"""Engines move RoundPlans to sites and SiteUpdates back: in one process, or over Flower."""
