"""A scripted browser for the test authorization server (tests/oauth2/idp.mjs).

Does what an admin does in a browser, with plain HTTPS requests: open the page, fill in
the form, follow the redirects. Cookies are kept as a browser keeps them. Used by
tests/common/oauth2.rs; usable by hand too:

  LMP_IDP_CA=ca.crt LMP_IDP_PASSWORD=pw python3 browser.py device ISSUER USER_CODE LOGIN
  LMP_IDP_CA=ca.crt LMP_IDP_PASSWORD=pw python3 browser.py authorize ISSUER URL LOGIN

`device` approves a device code (RFC 8628) and prints "approved". `authorize` opens an
authorization URL, signs in, and prints the URL the browser was sent back to (the one an
admin pastes into the gateway), e.g. http://127.0.0.1/callback?code=...&state=...
With LMP_IDP_DENY=1 the user presses "Deny" instead. Exit status 1 with the page's text
when something else happened.
"""

import html
import http.cookiejar
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request


class StopAtCallback(urllib.request.HTTPRedirectHandler):
    """Follows redirects inside the issuer; a redirect anywhere else (the client's
    redirect URI, which nobody serves) ends the walk and is reported."""

    def __init__(self, issuer):
        self.issuer = issuer
        self.left_to = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        if not newurl.startswith(self.issuer + "/"):
            self.left_to = newurl
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Browser:
    def __init__(self, issuer):
        self.issuer = issuer.rstrip("/")
        ctx = ssl.create_default_context(cafile=os.environ["LMP_IDP_CA"])
        self.redirects = StopAtCallback(self.issuer)
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ctx),
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
            self.redirects,
        )

    def open(self, url, form=None):
        """Returns (final URL, page text); the final URL is outside the issuer when a
        redirect left it."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(url, data=data, timeout=30) as r:
                return r.geturl(), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            if self.redirects.left_to is not None:
                url, self.redirects.left_to = self.redirects.left_to, None
                return url, ""
            fail("HTTP %d at %s: %s" % (e.code, url, text(e.read().decode("utf-8", "replace"))))

    def submit(self, page_url, page, form_id=None, fields=None):
        """Submits the page's form (the one with id `form_id`, else the first): its hidden
        inputs plus `fields`."""
        forms = re.findall(r"<form\b([^>]*)>(.*?)</form>", page, re.S | re.I)
        if form_id is not None:
            forms = [f for f in forms if re.search(r'id="%s"' % re.escape(form_id), f[0])]
        if not forms:
            fail("no form on %s: %s" % (page_url, text(page)))
        attrs, body = forms[0]
        action = re.search(r'action="([^"]*)"', attrs)
        action = urllib.parse.urljoin(page_url, html.unescape(action.group(1)) if action else "")
        values = {}
        for tag in re.findall(r"<input\b[^>]*>", body, re.I):
            if re.search(r'type="hidden"', tag, re.I):
                name = re.search(r'name="([^"]*)"', tag)
                value = re.search(r'value="([^"]*)"', tag)
                if name:
                    values[html.unescape(name.group(1))] = html.unescape(value.group(1)) if value else ""
        values.update(fields or {})
        return self.open(action, values)

    def sign_in(self, url, page, login):
        """Fills in the idp's sign-in page (approve, or deny with LMP_IDP_DENY=1)."""
        if 'name="login"' not in page:
            fail("expected the sign-in page at %s: %s" % (url, text(page)))
        fields = {"login": login, "password": os.environ.get("LMP_IDP_PASSWORD", "")}
        fields["deny" if os.environ.get("LMP_IDP_DENY") else "approve"] = "yes"
        url, page = self.submit(url, page, fields=fields)
        if "Unknown mail user or wrong password" in page:
            fail("the authorization server refused the login %r" % login)
        return url, page


def text(page):
    return " ".join(re.sub(r"<[^>]+>", " ", page).split())[:2000]


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def device(issuer, user_code, login):
    b = Browser(issuer)
    url, page = b.open(b.issuer + "/device")
    url, page = b.submit(url, page, fields={"user_code": user_code})
    if "op.deviceConfirmForm" not in page:
        fail("the code %r was not accepted: %s" % (user_code, text(page)))
    url, page = b.submit(url, page, form_id="op.deviceConfirmForm", fields={"confirm": "yes"})
    url, page = b.sign_in(url, page, login)
    if "Sign-in Success" in page:
        print("approved")
    elif os.environ.get("LMP_IDP_DENY") and "AbortedError" in page:
        print("denied")
    else:
        fail("the device approval did not end in success: %s" % text(page))


def authorize(issuer, auth_url, login):
    b = Browser(issuer)
    url, page = b.open(auth_url)
    if not url.startswith(b.issuer + "/"):
        print(url)  # already granted: straight back to the client
        return
    url, page = b.sign_in(url, page, login)
    if url.startswith(b.issuer + "/"):
        fail("the authorization did not return to the client: %s" % text(page))
    print(url)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in ("device", "authorize"):
        fail(__doc__)
    {"device": device, "authorize": authorize}[sys.argv[1]](*sys.argv[2:])
