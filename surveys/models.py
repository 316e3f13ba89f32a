"""Models of the surveys app (cohorts, runs, studies) arrive with the web issue."""
