"""Static files of the dashboard, served by the server at /ui/."""
