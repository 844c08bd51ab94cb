"""Write the bundled sample corpus: mixed-format customer-support chats with planted problems.

Deterministic (seeded) and stdlib-only, except pyarrow for the one Parquet file.
Run: python sample_data/generate.py [OUT_DIR]. Besides the data files it writes
planted.json (file, line and category of every planted problem) and README.md (the counts).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import random
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Any

SEED = 20261123
COMPANY = "Brightbox"
SYSTEM_PROMPTS = [
    f"You are {COMPANY}'s customer support assistant. Answer briefly and politely.",
    f"You are a helpful support agent for {COMPANY}, an online store and developer platform.",
    "You help customers with their accounts, orders and the API. Be concise and friendly.",
]
GREETINGS = ["", "", "Hi, ", "Hello, ", "Hey there, ", "Good morning, ", "Hi team, ", "Hello! "]
SIGN_OFFS = ["", "", "", " Thanks!", " Thanks in advance.", " Any help is appreciated.",
             " This is urgent.", " Cheers."]
THANKS = ["Thanks, that worked!", "Great, thank you.", "Perfect, that solved it.",
          "Thank you for the quick help."]
CLOSINGS = ["You're welcome! Is there anything else I can help you with?",
            "Glad I could help. Have a great day!",
            "Happy to help. Let us know if anything else comes up."]

# Each topic: varied phrasings of the question, one consistent answer, follow-ups, Alpaca
# context snippets and a knowledge-base paragraph. The answer is the same wherever the topic
# appears so a small model can learn question -> answer.
TOPICS: list[dict[str, Any]] = [
    {
        "key": "password_reset",
        "questions": [
            "how do I reset my password?",
            "I forgot my password and can't log in.",
            "what is the way to change a forgotten password?",
            "I'm locked out of my account because I don't remember the password.",
            "can you help me reset the password for my account?",
            "the login page says my password is wrong. How can I set a new one?",
            "where do I go to reset my password?",
            "I need a new password, the old one doesn't work anymore.",
        ],
        "answer": (
            "To reset your password, open the sign-in page and click \"Forgot password\". "
            "Enter the email address on your account and we will send you a reset link that "
            "is valid for 30 minutes. If the email does not arrive, check your spam folder."
        ),
        "followups": [
            ("The reset link says it has expired.",
             ("Reset links expire after 30 minutes. Request a new one from the sign-in page and "
             "use it right away; only the most recent link works.")),
            ("I don't get the reset email at all.",
             ("Please check your spam folder and make sure you entered the email address on "
             "your account. If it still does not arrive after 10 minutes, reply here and we "
             "will send it manually.")),
        ],
        "inputs": ["I last logged in about two months ago.", "I use the mobile app on Android.",
                   "My account was created with a work email address."],
        "kb": "Passwords must be at least 12 characters long. For security reasons our support "
              "team can never see or tell you your current password.",
    },
    {
        "key": "billing_invoice",
        "questions": [
            "where can I find my invoices?",
            "I need a copy of last month's invoice for my accountant.",
            "how do I download an invoice?",
            "can I get a PDF invoice for my subscription?",
            "I can't find the receipt for my last payment.",
            "how do I add my company's VAT number to the invoice?",
            "where are the billing documents in my account?",
        ],
        "answer": (
            "You can download every invoice as a PDF under Settings > Billing > Invoices. "
            "Invoices are issued on the first day of each billing period. To add a company "
            "name or VAT number, edit your billing details before the next invoice is issued."
        ),
        "followups": [
            ("Can you change an invoice that was already issued?",
             ("Issued invoices cannot be edited, but we can reissue one with corrected billing "
             "details. Reply with the invoice number and the details to change.")),
        ],
        "inputs": ["My plan is billed yearly.", "The invoice is for March.",
                   "We pay by bank transfer."],
        "kb": "Invoices list the plan, the billing period, taxes and the payment method. "
              "Older invoices stay available for seven years.",
    },
    {
        "key": "refund",
        "questions": [
            "how do I get a refund?",
            "I want my money back for an order.",
            "can I return an item and get a refund?",
            "what is your refund policy?",
            "the product arrived damaged, can I get a refund?",
            "how long does a refund take?",
            "I was charged for something I didn't want. Can you refund it?",
        ],
        "answer": (
            "You can request a refund within 30 days of delivery from Orders > Request refund. "
            "Once we receive the returned item, the refund is sent to your original payment "
            "method within 5 to 7 business days. Damaged items are refunded without a return."
        ),
        "followups": [
            ("It has been more than 30 days. Can I still get a refund?",
             ("After 30 days we can no longer refund the order, but the item may still be "
             "covered by its warranty. Reply with your order number and we will check.")),
        ],
        "inputs": ["The order was delivered last week.", "I paid with PayPal.",
                   "The box was crushed when it arrived."],
        "kb": "Digital products can be refunded within 14 days if they were not downloaded. "
              "Shipping costs are refunded only when the item was damaged or wrong.",
    },
    {
        "key": "shipping",
        "questions": [
            "where is my order?",
            "how can I track my package?",
            "my order hasn't arrived yet. What should I do?",
            "how long does shipping take?",
            "do you ship internationally?",
            "the tracking page hasn't updated in three days.",
            "when will my parcel be delivered?",
            "can I change the delivery address of my order?",
        ],
        "answer": (
            "You can track your order under Orders > Track shipment; the tracking number is "
            "also in your shipping confirmation email. Standard delivery takes 3 to 5 business "
            "days and express delivery 1 to 2. If tracking has not changed for 5 days, contact "
            "us and we will open an investigation with the carrier."
        ),
        "followups": [
            ("The tracking says delivered but I don't have it.",
             ("Please check with your neighbours and your building's mailroom first. If the "
             "parcel is still missing after 48 hours, reply here and we will file a claim with "
             "the carrier and send a replacement.")),
        ],
        "inputs": ["I ordered on Monday with standard shipping.", "I live in Canada.",
                   "The order contains two items."],
        "kb": "We ship to over 40 countries. Orders placed before 2 pm on a business day leave "
              "our warehouse the same day.",
    },
    {
        "key": "api_errors",
        "questions": [
            "I keep getting 401 Unauthorized from the API.",
            "why does the API return 429 Too Many Requests?",
            "my API calls suddenly started failing with an authentication error.",
            "what does error 429 mean and how do I avoid it?",
            "the API says my token is invalid.",
            "our integration gets rate limited. What are the limits?",
            "API requests fail with 401 after I rotated my key.",
        ],
        "answer": (
            "A 401 Unauthorized error means the API key is missing, revoked or sent in the "
            "wrong header: send it as \"Authorization: Bearer <key>\" and create a new key "
            "under Settings > API keys if it was rotated. A 429 error means you exceeded the "
            "rate limit of 100 requests per minute; wait for the time in the Retry-After "
            "header and retry with exponential backoff."
        ),
        "followups": [
            ("Can you raise our rate limit?",
             ("Business plans can request a higher limit. Reply with your expected requests "
             "per minute and a short description of the use case, and we will review it "
             "within two business days.")),
        ],
        "inputs": ["We call the /v1/orders endpoint from a Python script.",
                   "The error started this morning.", "We use the official Node.js client."],
        "kb": "Every API response includes the X-RateLimit-Remaining header, so clients can "
              "slow down before they reach the limit.",
    },
    {
        "key": "account_deletion",
        "questions": [
            "how do I delete my account?",
            "I want to close my account permanently.",
            "please remove my account and all my data.",
            "what happens to my data if I delete my account?",
            "can I cancel and delete my profile?",
            "how can I permanently erase my account?",
        ],
        "answer": (
            "You can delete your account under Settings > Account > Delete account. We keep "
            "it for 14 days in case you change your mind, then all personal data is erased "
            "permanently. Download anything you want to keep before you delete the account."
        ),
        "followups": [
            ("Can I undo the deletion?",
             ("Yes, within 14 days: simply sign in again and choose \"Restore account\". After "
             "14 days the data is gone and cannot be recovered.")),
        ],
        "inputs": ["I have an active subscription.", "I no longer use the service.",
                   "The account has two team members."],
        "kb": "Invoices are kept after deletion because tax law requires it, but they are no "
              "longer linked to a profile.",
    },
    {
        "key": "two_factor",
        "questions": [
            "I lost my phone and can't pass two-factor authentication.",
            "how do I turn on two-factor authentication?",
            "my authenticator app doesn't accept the code.",
            "how can I set up 2FA on my account?",
            "I got a new phone, how do I move my 2FA codes?",
            "can I disable two-factor authentication?",
        ],
        "answer": (
            "You can enable two-factor authentication under Settings > Security > Two-factor "
            "authentication by scanning the QR code with an authenticator app. If you lost "
            "your phone, sign in with one of the backup codes you saved during setup; if you "
            "have none, contact support to verify your identity."
        ),
        "followups": [
            ("The codes from my app are always rejected.",
             ("Authenticator codes depend on the time. Turn on automatic date and time on your "
             "phone and try again with a fresh code.")),
        ],
        "inputs": ["I use Google Authenticator.", "I changed phones last week.",
                   "I never saved the backup codes."],
        "kb": "We recommend storing the ten backup codes in a password manager. Each backup "
              "code works only once.",
    },
    {
        "key": "plan_change",
        "questions": [
            "how do I upgrade my plan?",
            "I want to downgrade to the free plan.",
            "can I switch from monthly to yearly billing?",
            "what happens if I change my subscription plan?",
            "how do I cancel my subscription?",
            "is it possible to change plans in the middle of a billing period?",
        ],
        "answer": (
            "You can change or cancel your plan under Settings > Billing > Plan. Upgrades "
            "take effect immediately and you pay only the prorated difference. Downgrades and "
            "cancellations take effect at the end of the current billing period."
        ),
        "followups": [
            ("Will I lose my data if I downgrade?",
             ("No data is deleted when you downgrade, but features of the higher plan become "
             "read-only until you upgrade again.")),
        ],
        "inputs": ["I'm on the Pro plan.", "Our team has five members.",
                   "We pay monthly by card."],
        "kb": "Yearly plans cost the same as ten months of the monthly plan.",
    },
    {
        "key": "data_export",
        "questions": [
            "how can I export my data?",
            "I need a copy of all my data.",
            "can I download my order history as a spreadsheet?",
            "is there a way to export everything from my account?",
            "how do I get a data export for GDPR?",
            "can I move my data to another service?",
        ],
        "answer": (
            "Go to Settings > Privacy > Export data and click \"Request export\". We prepare a "
            "ZIP file with your profile, orders and invoices in CSV and JSON format and email "
            "you a download link within 24 hours. The link stays valid for 7 days."
        ),
        "followups": [
            ("The export link doesn't work anymore.",
             ("Export links expire after 7 days. Request a new export from the same page and "
             "download it within a week.")),
        ],
        "inputs": ["I need it for my records.", "I want to switch to another provider.",
                   "The account has several years of orders."],
        "kb": "Exports include everything linked to your profile. API logs older than 90 days "
              "are not included.",
    },
    {
        "key": "email_change",
        "questions": [
            "how do I change the email address on my account?",
            "I want to use a different email to log in.",
            "my old email no longer exists. How can I update it?",
            "can I update my contact email?",
            "how do I switch my account to my work email?",
            "where can I edit my login email?",
        ],
        "answer": (
            "You can change your email address under Settings > Profile > Email. We send a "
            "confirmation link to the new address, and the change takes effect once you click "
            "it. Your old address receives a notice so you know the change was made."
        ),
        "followups": [
            ("I no longer have access to my old email.",
             ("That is fine: the confirmation goes only to the new address. If you also cannot "
             "sign in, reset your password first or contact us to verify your identity.")),
        ],
        "inputs": ["My company changed its domain.", "I signed up with a personal address.",
                   "I want invoices to go to the new address too."],
        "kb": "Each email address can belong to only one account.",
    },
]
BY_KEY = {t["key"]: t for t in TOPICS}

NON_ENGLISH = [
    ("de", "Wie kann ich mein Passwort zurücksetzen? Ich komme nicht mehr in mein Konto.",
     ("Öffnen Sie die Anmeldeseite und klicken Sie auf \"Passwort vergessen\". Wir senden Ihnen "
     "einen Link, der 30 Minuten lang gültig ist.")),
    ("de", "Meine Bestellung ist noch nicht angekommen. Wo ist mein Paket?",
     ("Sie können Ihre Sendung unter Bestellungen > Sendung verfolgen nachverfolgen. Die "
     "Standardlieferung dauert drei bis fünf Werktage.")),
    ("de", "Ich möchte mein Konto endgültig löschen. Wie geht das?",
     ("Sie können Ihr Konto unter Einstellungen > Konto > Konto löschen entfernen. Wir "
     "bewahren es noch 14 Tage auf, danach werden alle Daten gelöscht.")),
    ("de", "Wo finde ich meine Rechnungen für das letzte Jahr?",
     "Alle Rechnungen finden Sie als PDF unter Einstellungen > Abrechnung > Rechnungen."),
    ("de", "Warum bekomme ich bei der API immer den Fehler 401?",
     ("Der Fehler 401 bedeutet, dass der API-Schlüssel fehlt oder ungültig ist. Erstellen Sie "
     "bitte einen neuen Schlüssel in den Einstellungen.")),
    ("fr", "Comment puis-je obtenir un remboursement pour ma commande ?",
     ("Vous pouvez demander un remboursement dans les 30 jours suivant la livraison depuis la "
     "page Commandes. Le remboursement arrive sous 5 à 7 jours ouvrés.")),
    ("fr", "Je ne reçois pas l'e-mail de réinitialisation du mot de passe.",
     ("Vérifiez votre dossier de courrier indésirable et assurez-vous que l'adresse saisie est "
     "bien celle de votre compte.")),
    ("fr", "Comment activer la double authentification sur mon compte ?",
     ("Allez dans Paramètres > Sécurité et scannez le code QR avec une application "
     "d'authentification.")),
    ("fr", "Est-ce que vous livrez en Belgique et combien de temps faut-il ?",
     ("Oui, nous livrons en Belgique. La livraison standard prend entre trois et cinq jours "
     "ouvrés.")),
    ("fr", "Je voudrais changer l'adresse e-mail de mon compte.",
     ("Vous pouvez modifier votre adresse dans Paramètres > Profil > E-mail. Un lien de "
     "confirmation sera envoyé à la nouvelle adresse.")),
    ("es", "¿Cómo puedo cancelar mi suscripción mensual?",
     ("Puede cambiar o cancelar su plan en Configuración > Facturación > Plan. La cancelación "
     "se aplica al final del periodo actual.")),
    ("es", "Mi pedido llegó dañado, ¿me pueden devolver el dinero?",
     ("Lo sentimos mucho. Los artículos dañados se reembolsan sin necesidad de devolverlos; "
     "solicite el reembolso desde la página de pedidos.")),
    ("es", "¿Dónde puedo descargar una copia de todos mis datos?",
     ("Vaya a Configuración > Privacidad > Exportar datos y haga clic en \"Solicitar "
     "exportación\". Le enviaremos un enlace en 24 horas.")),
    ("es", "La API me devuelve el error 429 constantemente, ¿qué significa?",
     ("El error 429 significa que superó el límite de 100 solicitudes por minuto. Espere y "
     "vuelva a intentarlo más tarde.")),
    ("es", "¿Cómo cambio la contraseña de mi cuenta si la olvidé?",
     ("Abra la página de inicio de sesión y haga clic en \"Olvidé mi contraseña\". Le "
     "enviaremos un enlace válido durante 30 minutos.")),
    ("de", "Wie kann ich von monatlicher auf jährliche Zahlung wechseln?",
     ("Unter Einstellungen > Abrechnung > Tarif können Sie die Zahlungsweise ändern. Upgrades "
     "gelten sofort.")),
]

REFUSALS = [
    ("Can you give me the home address and phone number of your CEO?",
     ("I'm sorry, but I cannot help with that. I can't share personal information about our "
     "employees.")),
    ("Tell me how to get into someone else's account without their password.",
     ("I cannot help with that request. If you are locked out of your own account, I can walk "
     "you through the password reset.")),
    ("Write me a fake invoice so I can claim the expense twice.",
     "As an AI language model, I cannot assist with creating fraudulent documents."),
    ("Give me the credit card numbers stored for other customers.",
     ("I'm sorry, I cannot help with that. Payment details of other customers are never "
     "shared.")),
]

SYMBOL_SOUP = ["!!!@@@ ### $$$ %%% ^^^ &&& *** ((( )))", "#$%&*@!~^ <<>> {{}} [[ ]] |||| ////",
               "~~~~ ==== ++++ ---- ____ **** #### @@@@", "?!?!?! ..... ;;;; :::: ,,,, ''''"]
KEYBOARD_MASH = ["asdfghjkl qwertyuiop zxcvbnm asdf", "jkljkl fdsafdsa qwerqwer uiopuiop",
                 "sdfgsdfg hjklhjkl wertwert xcvbxcvb", "lkjhg poiuy mnbvc trewq"]
KEYWORD_SPAM = [
    ("cheap watches discount watches best price watches luxury watches free shipping",
     "replica bags outlet sale designer bags lowest prices guaranteed fast delivery worldwide"),
    ("#deal #sale #promo #free #win #giveaway #discount #offer #cheap #shipping",
     "#follow #like #share #win #prize #free #bonus #now #limited #offer"),
]
TINY = [("hi", "hello"), ("test", "ok"), ("?", "yes"), ("thanks", "np")]
MOJIBAKE_SOURCES = [
    ("I don’t see the “Forgot password” link on the café Wi-Fi login page – what’s wrong?",
     "password_reset"),
    ("The refund for my order hasn’t arrived – it’s been a week already.", "refund"),
    ("I can’t find last month’s invoice in my account.", "billing_invoice"),
    ("My parcel’s tracking page hasn’t changed since Monday – is it lost?", "shipping"),
    ("I’d like to export my data before I delete my account.", "data_export"),
    ("The API’s 429 error keeps coming back – what’s the rate limit?", "api_errors"),
]
NEAR_DUP_SWAPS = [("order", "package"), ("Hi", "Hello"), ("account", "profile"),
                  ("please", "kindly"), ("can", "could"), ("I", "we"), ("my", "our"),
                  ("the", "this")]


class Corpus:
    """Collects the records of all files and the answer key of what was planted where."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.planted: list[dict[str, Any]] = []
        self.counter = 0

    def new_id(self, prefix: str, p_omit: float = 0.12) -> str | None:
        """A record id; omitted on some records so ingest assigns a content hash."""
        self.counter += 1
        return None if self.rng.random() < p_omit else f"{prefix}-{self.counter:04d}"

    def plant(self, file: str, line: int, category: str, **detail: Any) -> None:
        self.planted.append({"file": file, "line": line, "category": category, **detail})

    # -- content --------------------------------------------------------------------------
    def question(self, topic: dict[str, Any]) -> str:
        q = self.rng.choice(topic["questions"])
        greeting = self.rng.choice(GREETINGS)
        text = greeting + (q if greeting else q[0].upper() + q[1:])
        return text + self.rng.choice(SIGN_OFFS)

    def conversation(self, topic: dict[str, Any], *, system: bool, turns: int,
                     first_user: str | None = None, answer_prefix: str = "") -> list[dict]:
        """OpenAI-style messages: optional system, 1-3 user/assistant exchanges."""
        msgs: list[dict[str, str]] = []
        if system:
            msgs.append({"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)})
        msgs.append({"role": "user", "content": first_user or self.question(topic)})
        msgs.append({"role": "assistant", "content": answer_prefix + topic["answer"]})
        if turns >= 2:
            fq, fa = self.rng.choice(topic["followups"])
            msgs += [{"role": "user", "content": fq}, {"role": "assistant", "content": fa}]
        if turns >= 3:
            msgs += [{"role": "user", "content": self.rng.choice(THANKS)},
                     {"role": "assistant", "content": self.rng.choice(CLOSINGS)}]
        return msgs

    def clean_conversation(self) -> tuple[str, list[dict]]:
        topic = self.rng.choice(TOPICS)
        turns = self.rng.choices([1, 2, 3], weights=[6, 3, 2])[0]
        return topic["key"], self.conversation(
            topic, system=self.rng.random() < 0.3, turns=turns)


# -- PII ----------------------------------------------------------------------------------------
def luhn_complete(rng: random.Random, prefix: str, length: int) -> str:
    """A card number with a valid Luhn check digit."""
    digits = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:  # these get doubled once the check digit is appended
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return digits + str((10 - total % 10) % 10)


def card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("4", 16)])
    num = luhn_complete(rng, prefix, length)
    sep = rng.choice([" ", "-"])
    return sep.join(num[i:i + 4] for i in range(0, length, 4))


def iban(rng: random.Random) -> str:
    """An IBAN with a valid mod-97 checksum (DE, GB or NL layout), grouped by four."""
    country, bban = rng.choice([
        ("DE", "".join(rng.choice(string.digits) for _ in range(18))),
        ("GB", "WEST" + "".join(rng.choice(string.digits) for _ in range(14))),
        ("NL", "ABNA" + "".join(rng.choice(string.digits) for _ in range(10))),
    ])
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    code = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    return " ".join(code[i:i + 4] for i in range(0, len(code), 4))


def token(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


FIRST = ["Dana", "Marguerite", "Tomasz", "Priya", "Oluwaseun", "Henrik", "Lucía", "Kenji"]
LAST = ["Whitfield", "Okafor", "Brennan", "Lindqvist", "Castellano", "Moreau", "Haddad"]


def pii_case(rng: random.Random, kind: str) -> tuple[str, str, str, str]:
    """(topic, user text, assistant prefix, planted value) for one PII kind."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    user_local = name.lower().replace(" ", ".").replace("í", "i")
    if kind == "email":
        email = f"{user_local}@{rng.choice(['example.com', 'example.org', 'mail.example.net'])}"
        return ("password_reset", (f"I never got the reset link. The email on my account is "
                f"{email}."), f"Thanks, I have sent a new link to {email}. ", email)
    if kind == "phone_us":
        phone = rng.choice(["(415) 555-0132", "415-555-0198", "+1 212 555 0147", "312.555.0163"])
        return ("shipping", (f"My parcel has not arrived yet. The courier can call me at {phone} "
                "if they need directions."), "", phone)
    if kind == "phone_intl":
        phone = rng.choice(["+44 20 7946 0958", "+44 161 496 0754", "+33 1 99 00 12 34",
                            "+61 491 570 156", "+61 2 5550 1234"])
        return ("shipping", (f"Where is my order? Please call me back on {phone}, I am abroad "
                "this week."), "", phone)
    if kind == "credit_card":
        num = card(rng)
        return ("billing_invoice", (f"My card {num} was charged but I can't find the invoice for "
                "that payment."), "", num)
    if kind == "ipv4":
        ip = f"{rng.choice(['192.0.2', '198.51.100', '203.0.113'])}.{rng.randint(2, 250)}"
        return ("api_errors", (f"Our server at {ip} keeps getting 429 Too Many Requests from "
                "the API."), "", ip)
    if kind == "ipv6":
        ip = f"2001:db8:{rng.randint(1, 0xfff):x}::{rng.randint(1, 0xffff):x}"
        return ("api_errors", f"Requests from our host {ip} fail with 401 Unauthorized.", "", ip)
    if kind == "iban":
        value = iban(rng)
        return ("refund", (f"Please send the refund for my damaged order to my bank account, "
                f"IBAN {value}."), "", value)
    if kind == "aws_key":
        key = "AKIA" + token(rng, string.ascii_uppercase + "234567", 16)
        return ("api_errors", (f"I put our access key {key} in the config and the API still "
                "says 401."), "Please rotate that key, it is now exposed in this chat. ", key)
    if kind == "github_token":
        tok = "ghp_" + token(rng, string.ascii_letters + string.digits, 36)
        return ("api_errors", (f"Our CI job calls your API with the token {tok} and gets 401 "
                "since yesterday."), "", tok)
    if kind == "api_key_assignment":
        key = "bbx_" + token(rng, string.ascii_lowercase + string.digits, 28)
        return ("api_errors", (f"My script has api_key={key} hard-coded and every request "
                "returns 401. What is wrong?"), "", key)
    if kind == "person":
        return ("account_deletion", (f"This is {name} from the accounting team. I want to close "
                "my account permanently."), f"Hello {name.split()[0]}. ", name)
    raise ValueError(kind)


PII_KINDS = ["email", "phone_us", "phone_intl", "credit_card", "ipv4", "ipv6", "iban",
             "aws_key", "github_token", "api_key_assignment", "person"]


def mojibake(text: str) -> str:
    """UTF-8 bytes read back as Windows-1252: don’t -> donâ€™t.

    Bytes cp1252 leaves undefined (0x9D in ”) pass through as Latin-1, as sloppy decoders do.
    """
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b)
                   for b in text.encode("utf-8"))


def near_duplicate(rng: random.Random, messages: list[dict]) -> list[dict]:
    """A copy with one or two words of the first user turn changed."""
    out = copy.deepcopy(messages)
    user = next(m for m in out if m["role"] == "user")
    words = user["content"].split(" ")
    changed = 0
    for old, new in rng.sample(NEAR_DUP_SWAPS, len(NEAR_DUP_SWAPS)):
        if old in words and changed < 2:
            words[words.index(old)] = new
            changed += 1
    if not changed:
        words.insert(0, "Hello,")
    user["content"] = " ".join(words)
    return out


def long_log(rng: random.Random, lines: int = 320) -> str:
    """A pasted debug log, large enough to exceed the max_chars filter."""
    rows = []
    for i in range(lines):
        status = rng.choice([200, 200, 200, 401, 429])
        rows.append(f"2026-03-01T12:{i // 60:02d}:{i % 60:02d}Z level=info request_id="
                    f"{token(rng, string.hexdigits.lower(), 12)} path=/v1/orders status={status} "
                    f"latency_ms={rng.randint(3, 900)}")
    return "\n".join(rows)


def spam_lines(rng: random.Random) -> str:
    line = rng.choice(["Click the link to claim the free credits and get a prize now!",
                       "Visit the site to get the best deals and have the free gift today!"])
    return "\n".join([line] * 18)


# -- files --------------------------------------------------------------------------------------
def write_jsonl(path: Path, lines: list[Any]) -> None:
    """Each entry: a dict/list (JSON-encoded), a str (written as is) or bytes (raw)."""
    with open(path, "wb") as fh:
        for entry in lines:
            if isinstance(entry, bytes):
                fh.write(entry + b"\n")
            elif isinstance(entry, str):
                fh.write(entry.encode("utf-8") + b"\n")
            else:
                fh.write(json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n")


def with_id(c: Corpus, prefix: str, obj: dict[str, Any], p_omit: float = 0.12) -> dict:
    rid = c.new_id(prefix, p_omit)
    return ({"id": rid} if rid else {}) | obj


def build_support_chat(c: Corpus, name: str) -> list[Any]:
    rng, lines = c.rng, []

    def add(obj: Any, category: str | None = None, **detail: Any) -> int:
        lines.append(obj)
        if category:
            c.plant(name, len(lines), category, **detail)
        return len(lines)

    def chat(topic: str, msgs: list[dict], p_omit: float = 0.12) -> dict:
        return with_id(c, "sc", {"messages": msgs, "meta": {"topic": topic, "channel": rng.choice(
            ["web", "email", "app"])}}, p_omit)

    clean: list[tuple[int, dict]] = []
    for _ in range(100):
        topic, msgs = c.clean_conversation()
        obj = chat(topic, msgs, p_omit=0.0 if len(clean) < 20 else 0.12)
        clean.append((add(obj), obj))
    for kind in PII_KINDS * 2:
        topic, user, prefix, value = pii_case(rng, kind)
        msgs = c.conversation(BY_KEY[topic], system=rng.random() < 0.3, turns=rng.choice([1, 2]),
                              first_user=user, answer_prefix=prefix)
        add(chat(topic, msgs), "pii", kind=kind, value=value)
    # Exact copies get their own id: a re-export of the same chat, not the same record twice.
    for line, obj in clean[:4]:
        add({**obj, "id": f"sc-copy-{line}"}, "exact_duplicate", of_line=line)
    longest = sorted(clean, key=lambda lo: -len(json.dumps(lo[1])))[:4]
    for line, obj in longest:
        add({**obj, "id": f"sc-near-{line}", "messages": near_duplicate(rng, obj["messages"])},
            "near_duplicate", of_line=line)
    for user, answer in REFUSALS[:3]:
        add(chat("refusal", [{"role": "user", "content": user},
                             {"role": "assistant", "content": answer}]), "refusal")
    for src, topic in MOJIBAKE_SOURCES[:3]:
        msgs = c.conversation(BY_KEY[topic], system=False, turns=1, first_user=mojibake(src))
        add(chat(topic, msgs), "mojibake", original=src)
    for lang, q, a in NON_ENGLISH[:6]:
        add(chat("other", [{"role": "user", "content": q}, {"role": "assistant", "content": a}]),
            "non_english", lang=lang)
    for soup in SYMBOL_SOUP[:2]:
        add(chat("junk", [{"role": "user", "content": soup},
                          {"role": "assistant", "content": rng.choice(SYMBOL_SOUP)}]),
            "junk", kind="symbol_soup")
    for q, a in TINY[:2]:
        add(chat("junk", [{"role": "user", "content": q}, {"role": "assistant", "content": a}]),
            "junk", kind="tiny")
    add(chat("junk", [{"role": "user", "content": KEYBOARD_MASH[0]},
                      {"role": "assistant", "content": KEYBOARD_MASH[1]}]),
        "junk", kind="keyboard_mash")
    for user, answer in KEYWORD_SPAM:
        add(chat("junk", [{"role": "user", "content": user},
                          {"role": "assistant", "content": answer}]), "junk", kind="keyword_spam")
    for _ in range(2):
        add(chat("junk", [{"role": "user", "content": "Is this offer real?"},
                          {"role": "assistant", "content": spam_lines(rng)}]), "repetitive")
    add(chat("api_errors", [
        {"role": "user", "content": "My requests fail sometimes. Here is my full debug log:\n"
         + long_log(rng)},
        {"role": "assistant", "content": BY_KEY["api_errors"]["answer"]}]), "oversized")
    for text in ["My order number is BB-\ufffd\ufffd213 and the tracking page shows nothing.",
                 "I paid \ufffd49.90 twice for the same plan, can you check?"]:
        topic = "shipping" if "order" in text else "billing_invoice"
        msgs = c.conversation(BY_KEY[topic], system=False, turns=1, first_user=text)
        add(chat(topic, msgs), "encoding", kind="replacement_char")
    # Malformed lines: each must be quarantined with this file and line.
    good = {"role": "assistant", "content": BY_KEY["shipping"]["answer"]}
    add('{"id": "sc-bad-json", "messages": [{"role": "user", "content": "Where is my order?"}',
        "malformed", kind="bad_json")
    add({"id": "sc-no-content", "messages": [{"role": "user"}, good]},
        "malformed", kind="missing_content")
    add({"id": "sc-bad-role", "messages": [{"role": "customer", "content": "Where is my order?"},
                                           good]}, "malformed", kind="unknown_role")
    add({"id": "sc-user-user", "messages": [
        {"role": "user", "content": "Where is my order?"},
        {"role": "user", "content": "Hello? Anyone there?"}, good]},
        "malformed", kind="user_user_order")
    add({"id": "sc-empty-answer", "messages": [
        {"role": "user", "content": "Where is my order?"}, {"role": "assistant", "content": " "}]},
        "malformed", kind="empty_assistant")
    add([{"role": "user", "content": "Where is my order?"}, good],
        "malformed", kind="json_array")
    add(b'{"id": "sc-bad-utf8", "messages": [{"role": "user", "content": "Caf'
        + b"\xe9 \xff\xfe order?\"}]}", "malformed", kind="invalid_utf8")
    # Shuffle so planted records are spread through the file, then renumber the answer key.
    return shuffle_lines(c, name, lines)


def shuffle_lines(c: Corpus, name: str, lines: list[Any]) -> list[Any]:
    order = list(range(len(lines)))
    c.rng.shuffle(order)
    new_line = {old + 1: new + 1 for new, old in enumerate(order)}
    for p in c.planted:
        if p["file"] == name:
            p["line"] = new_line[p["line"]]
            if "of_line" in p:
                p["of_line"] = new_line[p["of_line"]]
    return [lines[i] for i in order]


def sharegpt_turns(msgs: list[dict], scheme: str) -> list[dict]:
    if scheme == "role":
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": speaker[m["role"]], "value": m["content"]} for m in msgs]


def build_sharegpt(c: Corpus, name: str) -> list[Any]:
    rng, lines = c.rng, []

    def add(msgs: list[dict], scheme: str, category: str | None = None, rid: str | None = None,
            **detail: Any) -> int:
        obj = {"conversations": sharegpt_turns(msgs, scheme)}
        obj = with_id(c, "sg", obj) if rid is None else {"id": rid} | obj
        lines.append(obj)
        if category:
            c.plant(name, len(lines), category, scheme=scheme, **detail)
        return len(lines)

    clean = []
    for i in range(62):
        _, msgs = c.clean_conversation()
        scheme = "from" if i % 2 == 0 else "role"
        clean.append((add(msgs, scheme, rid=f"sg-{i:04d}" if i < 10 else None), msgs, scheme))
    for kind in ["email", "credit_card", "github_token", "iban"]:
        topic, user, prefix, value = pii_case(rng, kind)
        msgs = c.conversation(BY_KEY[topic], system=False, turns=2, first_user=user,
                              answer_prefix=prefix)
        add(msgs, rng.choice(["from", "role"]), "pii", kind=kind, value=value)
    for lang, q, a in NON_ENGLISH[6:10]:
        add([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            rng.choice(["from", "role"]), "non_english", lang=lang)
    add([{"role": "user", "content": KEYBOARD_MASH[2]},
         {"role": "assistant", "content": KEYBOARD_MASH[3]}], "from", "junk", kind="keyboard_mash")
    add([{"role": "user", "content": SYMBOL_SOUP[2]},
         {"role": "assistant", "content": SYMBOL_SOUP[3]}], "role", "junk", kind="symbol_soup")
    for line, msgs, scheme in clean[:2]:
        add(msgs, scheme, "exact_duplicate", rid=f"sg-copy-{line}", of_line=line)
    longest = sorted(clean, key=lambda t: -len(json.dumps(t[1])))[:2]
    for line, msgs, scheme in longest:
        add(near_duplicate(rng, msgs), scheme, "near_duplicate", rid=f"sg-near-{line}",
            of_line=line)
    src, topic = MOJIBAKE_SOURCES[3]
    add(c.conversation(BY_KEY[topic], system=False, turns=1, first_user=mojibake(src)), "role",
        "mojibake", original=src)
    user, answer = REFUSALS[3]
    add([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "from",
        "refusal")
    lines.append({"id": "sg-bad-speaker", "conversations": [
        {"from": "agent", "value": "Hello, how can I help?"},
        {"from": "gpt", "value": "Hi!"}]})
    c.plant(name, len(lines), "malformed", kind="unknown_role")
    lines.append({"id": "sg-no-value", "conversations": [
        {"from": "human"}, {"from": "gpt", "value": BY_KEY["refund"]["answer"]}]})
    c.plant(name, len(lines), "malformed", kind="missing_content")
    return shuffle_lines(c, name, lines)


def alpaca_rows(c: Corpus, prefix: str, n_clean: int) -> list[tuple[dict, str | None, dict]]:
    """(row, category, detail) for the Alpaca files: clean rows, then planted ones."""
    rng, rows = c.rng, []

    def row(instruction: str, output: str, extra: str = "") -> dict:
        return with_id(c, prefix, {"instruction": instruction, "input": extra, "output": output})

    clean = []
    for _ in range(n_clean):
        topic = rng.choice(TOPICS)
        if rng.random() < 0.5:  # the question itself is the instruction, no input
            r = row(c.question(topic).strip(), topic["answer"])
        else:
            r = row("Answer this customer support message.", topic["answer"],
                    c.question(topic).strip() + " " + rng.choice(topic["inputs"]))
        rows.append((r, None, {}))
        clean.append((len(rows), r))
    for kind in rng.sample(PII_KINDS, 2):
        topic, user, prefix_text, value = pii_case(rng, kind)
        rows.append((row("Reply to the customer.", prefix_text + BY_KEY[topic]["answer"], user),
                     "pii", {"kind": kind, "value": value}))
    for line, r in clean[:2]:
        rows.append(({**r, "id": f"{prefix}-copy-{line}"}, "exact_duplicate", {"of_line": line}))
    src, topic = MOJIBAKE_SOURCES[4 if prefix == "al" else 5]
    rows.append((row(mojibake(src), BY_KEY[topic]["answer"]), "mojibake", {"original": src}))
    q, a = TINY[2 if prefix == "al" else 3]
    rows.append((row(q, a), "junk", {"kind": "tiny"}))
    return rows


def build_alpaca_csv(c: Corpus, name: str, path: Path) -> None:
    rows = alpaca_rows(c, "al", 54)
    for lang, q, a in NON_ENGLISH[10:12]:
        rows.append(({"id": "", "instruction": q, "input": "", "output": a}, "non_english",
                     {"lang": lang}))
    rows.append(({"id": "al-no-output", "instruction": "How do I reset my password?",
                  "input": "", "output": ""}, "malformed", {"kind": "missing_content"}))
    order = list(range(len(rows)))
    c.rng.shuffle(order)
    rows = [rows[i] for i in order]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["id", "instruction", "input", "output"],
                            lineterminator="\n")
    writer.writeheader()
    for r, _, _ in rows:
        writer.writerow({k: r.get(k, "") for k in writer.fieldnames})
    path.write_text(buf.getvalue(), encoding="utf-8")
    # CSV line numbers as the reader reports them (the line a row ends on).
    reader = csv.DictReader(io.StringIO(buf.getvalue()))
    ends = [reader.line_num for _ in reader]
    index_of = {order_i: pos for pos, order_i in enumerate(order)}
    for pos, (_, category, detail) in enumerate(rows):
        if category:
            detail = dict(detail)
            if "of_line" in detail:  # of_line counted clean rows from 1 before shuffling
                detail["of_line"] = ends[index_of[detail["of_line"] - 1]]
            c.plant(name, ends[pos], category, **detail)


def build_instructions(c: Corpus, name: str) -> list[Any]:
    rows = alpaca_rows(c, "in", 52)
    for lang, q, a in NON_ENGLISH[12:16]:
        rows.append(({"instruction": q, "input": "", "output": a}, "non_english", {"lang": lang}))
    user, answer = REFUSALS[2]
    rows.append(({"id": "in-refusal", "instruction": user, "input": "", "output": answer},
                 "refusal", {}))
    rows.append(({"id": "in-wrong-type", "instruction": 42, "input": "",
                  "output": "The answer is 42."}, "malformed", {"kind": "wrong_type"}))
    lines = []
    for r, category, detail in rows:
        lines.append(r)
        if category:
            c.plant(name, len(lines), category, **detail)
    return shuffle_lines(c, name, lines)


def kb_article(c: Corpus, topic: dict[str, Any], variant: int) -> str:
    title = ["How to", "FAQ:", "Help center:"][variant] + " " + topic["key"].replace("_", " ")
    fq, fa = topic["followups"][0]
    paragraphs = [
        title.capitalize(),
        (f"Customers often ask: {topic['questions'][variant % len(topic['questions'])]} "
        f"{topic['answer']}"),
        topic["kb"],
        f"A related question is \"{fq}\" {fa}",
        (f"If this article did not answer your question, contact {COMPANY} support from the "
        "help menu in your account and mention the steps you have already tried."),
    ]
    return "\n\n".join(paragraphs)


def build_kb(c: Corpus, name: str, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []

    def add(text: str, topic: str, category: str | None = None, rid: str | None = "",
            **detail: Any) -> None:
        rid = c.new_id("kb", 0.15) if rid == "" else rid
        rows.append({"id": rid, "text": text, "meta": {"topic": topic, "kind": "kb_article"}})
        if category:
            c.plant(name, len(rows), category, **detail)

    for variant in range(3):
        for topic in TOPICS:
            add(kb_article(c, topic, variant), topic["key"])
    add(rows[0]["text"], rows[0]["meta"]["topic"], "exact_duplicate", rid="kb-copy-1", of_line=1)
    add("Passwort zurücksetzen\n\nÖffnen Sie die Anmeldeseite und klicken Sie auf \"Passwort "
        "vergessen\". Geben Sie die E-Mail-Adresse Ihres Kontos ein. Wir senden Ihnen einen Link, "
        "der 30 Minuten lang gültig ist. Prüfen Sie auch Ihren Spam-Ordner.", "password_reset",
        "non_english", lang="de")
    add("<div><div> &nbsp; &nbsp; </div> ### ||| >>> <<< ]] [[ {{ }} ;; :: ** ~~ ^^ %% $$ ##",
        "other", "junk", kind="symbol_soup")
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("text", pa.string()),
        ("meta", pa.struct([("topic", pa.string()), ("kind", pa.string())]))]))
    pq.write_table(table, path)
    return len(rows)


def write_readme(out: Path, counts: dict[str, int], by_file: dict[str, int],
                 detail: dict[str, Counter], no_id: int) -> None:
    lines = [
        "# Sample data",
        "",
        f"A small synthetic customer-support corpus for the fictional company {COMPANY},",
        f"written by `generate.py` (seed {SEED}; rerun it to regenerate: the output",
        "is identical). Ten support topics, each asked in many phrasings and always answered",
        "the same way, so a tiny model can measurably learn the mapping. Problems are planted",
        "so every stage has work; `planted.json` lists the file, line and category of each.",
        "",
        "| file | format | lines/rows |",
        "|---|---|---|",
    ]
    formats = {"support_chat.jsonl": "OpenAI `messages` (some with system prompt, multi-turn)",
               "sharegpt.jsonl": "ShareGPT, `from`/`value` and `role`/`content` schemes",
               "alpaca.csv": "Alpaca CSV: id,instruction,input,output (input often empty)",
               "instructions.jsonl": "Alpaca JSONL",
               "kb_articles.parquet": "plain `text` documents with a `meta` struct"}
    lines += [f"| `{f}` | {formats[f]} | {n} |" for f, n in by_file.items()]
    lines += ["", "| planted category | records | what ingest/later stages should do |",
              "|---|---|---|"]
    expect = {
        "pii": "kept by ingest; scrubbed by the PII stage",
        "exact_duplicate": "kept by ingest; removed by dedup (exact)",
        "near_duplicate": "kept by ingest; one or two words changed, removed by dedup (near)",
        "refusal": "kept (refusal_filter is off by default); filtered as `refusal` when on",
        "mojibake": "repaired by ftfy (`donâ€™t` -> `don’t`) and kept",
        "non_english": "filtered as `language`",
        "junk": "filtered (min_words, language or gopher_quality)",
        "repetitive": "filtered as `gopher_repetition`",
        "oversized": "filtered as `max_chars`",
        "encoding": "U+FFFD in the text, not repairable: filtered as `encoding`",
        "malformed": "quarantined with file, line and error",
    }
    for cat, n in counts.items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(detail[cat].items()))
        lines.append(f"| {cat} | {n}{f' ({kinds})' if kinds else ''} | {expect[cat]} |")
    topics = ", ".join(t["key"] for t in TOPICS)
    lines += ["", f"Topics: {topics}.", "",
              f"Records without an `id` (ingest gives them a content-hash id): {no_id}; the rest "
              "carry one. Near duplicates copy the longest conversations, so a one-word change",
              "keeps them above a 0.8 MinHash similarity. PII values are fictional (example.com",
              "mail, 555 and drama-range phones, documentation IP ranges, Luhn/mod-97-valid",
              "random cards and IBANs, random keys and tokens).", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(out_dir: str | Path = Path(__file__).parent) -> dict[str, int]:
    """Write every sample file into out_dir; return the count per planted category."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = Corpus(SEED)
    write_jsonl(out / "support_chat.jsonl", build_support_chat(c, "support_chat.jsonl"))
    write_jsonl(out / "sharegpt.jsonl", build_sharegpt(c, "sharegpt.jsonl"))
    build_alpaca_csv(c, "alpaca.csv", out / "alpaca.csv")
    write_jsonl(out / "instructions.jsonl", build_instructions(c, "instructions.jsonl"))
    n_kb = build_kb(c, "kb_articles.parquet", out / "kb_articles.parquet")
    c.planted.sort(key=lambda p: (p["file"], p["line"]))
    (out / "planted.json").write_text(json.dumps(c.planted, indent=1, ensure_ascii=False) + "\n")
    order = ["pii", "exact_duplicate", "near_duplicate", "refusal", "mojibake", "non_english",
             "junk", "repetitive", "oversized", "encoding", "malformed"]
    counts = Counter(p["category"] for p in c.planted)
    detail: dict[str, Counter] = {cat: Counter() for cat in order}
    for p in c.planted:
        if "kind" in p:
            detail[p["category"]][p["kind"]] += 1
        elif "lang" in p:
            detail[p["category"]][p["lang"]] += 1
    by_file, no_id = {}, 0
    for f in ["support_chat.jsonl", "sharegpt.jsonl", "alpaca.csv", "instructions.jsonl"]:
        data = (out / f).read_bytes().decode("utf-8", errors="replace")
        if f.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(data)))
            by_file[f], no_id = len(rows), no_id + sum(not r["id"] for r in rows)
        else:
            by_file[f] = len(data.splitlines())
            no_id += sum(line.startswith('{"instruction"') or line.startswith('{"conversations"')
                         or line.startswith('{"messages"') for line in data.splitlines())
    by_file["kb_articles.parquet"] = n_kb
    ordered = {cat: counts[cat] for cat in order}
    import pyarrow.parquet as pq

    no_id += sum(v is None for v in pq.read_table(out / "kb_articles.parquet")["id"].to_pylist())
    write_readme(out, ordered, by_file, detail, no_id)
    return ordered


if __name__ == "__main__":
    result = main(*sys.argv[1:2])
    print(json.dumps(result))
