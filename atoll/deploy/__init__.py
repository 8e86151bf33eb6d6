"""Running a real federation: keys and certificates, the coordinator and site processes."""
