"""Boilerplate line patterns (Polish and English web pages) for `orlik data clean`.

Each pattern matches a whole short line that carries no text of its own: cookie and consent
banners, navigation and sharing widgets, copyright footers, "read more" links. A pattern is only
tried on lines of at most MAX_LEN characters, so a paragraph that merely mentions cookies stays.
"""

from __future__ import annotations

import re

MAX_LEN = 200

_RAW = [
    # cookie / consent banners
    r"(ta strona|ten serwis|strona|serwis|witryna|nasza strona)\b.{0,60}\b(używa|wykorzystuje|stosuje) (plików |ciasteczek|cookie)",
    r"\b(pliki cookie|plików cookie|ciasteczka|ciasteczek)\b.{0,120}\b(zgod|akcept|ustawie|przeglądar|polityk)",
    r"\b(this (web)?site|we) (uses?|use) cookies\b",
    r"^(akceptuję|zaakceptuj( wszystkie)?|accept( all)?( cookies)?|zgadzam się|odrzuć( wszystkie)?|reject all|ustawienia cookies?|cookie settings)\W*$",
    r"^(polityka prywatności|privacy policy|regulamin|terms of (use|service)|rodo)\W*(\|.*)?$",
    # navigation, sharing, calls to action
    r"^(strona główna|home|menu|szukaj|search|zaloguj( się)?|log ?in|sign in|zarejestruj( się)?|register|kontakt|contact( us)?|o nas|about us|mapa strony|sitemap)(\s*[|»>/•·-]\s*\S.*)?$",
    r"^(przejdź do (treści|menu|głównej zawartości)|skip to (main )?content)\W*$",
    r"^(udostępnij|share)( (na|on) (facebooku?|twitterze|twitter|x|linkedin))?\W*$",
    r"^(czytaj (więcej|dalej)|read more|zobacz (też|także|więcej)|see also|więcej|more)\W*(»|>|…|\.\.\.)?\W*$",
    r"^(komentarze|comments|dodaj komentarz|leave a (comment|reply)|odpowiedz|reply)\s*(\(\d+\))?\W*$",
    r"^([^|»•·]{1,30}[|»•·]\s*){3,}[^|»•·]{1,30}$",  # "Home | News | Sport | Contact" menus
    r"^(tagi|tags|kategori[ae]|categories)\s*:",
    r"^(zapisz się|subskrybuj|subscribe|newsletter)\b.{0,80}$",
    # footers
    r"(©|\(c\)|copyright)\s*\d{4}",
    r"\b(wszelkie prawa zastrzeżone|all rights reserved)\b",
    r"^(reklama|advertisement|sponsorowane|sponsored)\W*$",
]

BOILERPLATE = [re.compile(rf"(?i)^(?=.{{0,{MAX_LEN}}}$).*?(?:{p})") for p in _RAW]
# One alternation for the hot path: a single scan per line instead of one per pattern.
ANY = re.compile(rf"(?i)^(?=.{{0,{MAX_LEN}}}$).*?(?:{'|'.join(f'(?:{p})' for p in _RAW)})")
