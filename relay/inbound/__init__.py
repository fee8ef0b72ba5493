"""The server side: SMTP sessions with the applications that submit mail."""
