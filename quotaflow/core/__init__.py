"""The ground floor: settings, logging, metrics, errors. Imports no stage."""
