"""The checks policies ask for: DNS, SPF, DKIM, rate limits, and the services that run them."""
