/* pycni's plugin executable in C: what pycni/shim.py does on its agent path, without the ~30 ms
 * of Python start-up per exec, and for nodes that have no python3 at all.
 *
 * Read the network config on stdin, pick the agent socket from its top-level "agentSocket"
 * exactly as shim.socket_path() does, send the request shim.call_agent() sends (same bytes),
 * write the agent's answer to stdout and exit with its status. Without an agent: exec
 * PYCNI_FALLBACK (the Python launcher that runs the plugin in-process) with the same stdin
 * bytes and environment, or, built without one, answer CNI error 11 as the standalone Python
 * launcher does. Nothing else is ever written to stdout, nothing to stderr but fatal errors.
 *
 * Built by pycni/native/build.py, which passes every constant shared with the Python side with
 * -D (each stays defined once, in Python). C99 and libc only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if !defined(PYCNI_MAX_CONFIG_BYTES) || !defined(PYCNI_DEFAULT_SOCKET) || \
    !defined(PYCNI_MAGIC) || !defined(PYCNI_TIMEOUT_MS) || !defined(PYCNI_VERSIONS) || \
    !defined(PYCNI_CONNECT_TIMEOUT_MS) || \
    !defined(PYCNI_FORWARDED) || !defined(PYCNI_JSON_MAX_DEPTH) || \
    !defined(PYCNI_INT_MAX_DIGITS) || !defined(PYCNI_MARKER)
#error "build with pycni.native.build: it passes pycni's constants with -D"
#endif

extern char **environ;

/* How `pycnictl install` and `uninstall` recognise this executable as pycni's. */
#if defined(__GNUC__)
__attribute__((used))
#endif
const char pycni_marker[] = PYCNI_MARKER;

#define CONFIG_KEY "\"agentSocket\""

/* --- growable byte buffers ---------------------------------------------------------------- */

struct buf {
    unsigned char *data;
    size_t len, cap;
};

static void die_nomem(void)
{
    static const char msg[] = "pycni: out of memory\n";
    if (write(2, msg, sizeof msg - 1) < 0) {
        /* nothing more to say */
    }
    _exit(1);
}

static void buf_reserve(struct buf *b, size_t extra)
{
    if (extra <= b->cap - b->len)
        return;
    if (extra > SIZE_MAX / 2 - b->len)
        die_nomem();
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra)
        cap *= 2;
    unsigned char *data = realloc(b->data, cap);
    if (data == NULL)
        die_nomem();
    b->data = data;
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
    if (n == 0)
        return;
    buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void buf_str(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

/* --- UTF-8, as Python's strict decoder and surrogateescape encoder see it ---------------- */

/* Length of the valid UTF-8 sequence at s[i] (0 if invalid), its code point in *cp. */
static size_t utf8_next(const unsigned char *s, size_t len, size_t i, uint32_t *cp)
{
    unsigned char c = s[i];
    size_t n;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if (c >= 0xC2 && c <= 0xDF) {
        n = 2, v = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, v = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (len - i < n)
        return 0;
    for (size_t k = 1; k < n; k++) {
        if ((s[i + k] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (s[i + k] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return 0; /* overlong, beyond Unicode, or an encoded surrogate */
    *cp = v;
    return n;
}

static int utf8_valid(const unsigned char *s, size_t len)
{
    uint32_t cp;
    for (size_t i = 0; i < len;) {
        size_t n = utf8_next(s, len, i, &cp);
        if (n == 0)
            return 0;
        i += n;
    }
    return 1;
}

/* str.isspace(): what Python's strip() and lstrip() remove. */
static int py_isspace(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* A str as bytes for connect(): UTF-8 with surrogateescape (U+DC80..U+DCFF are the bytes
 * 0x80..0xFF). 0 when it cannot be encoded (another lone surrogate: Python's ValueError). */
static int encode_fs(const uint32_t *cps, size_t n, struct buf *out)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t c = cps[i];
        unsigned char b[4];
        size_t k;
        if (c >= 0xDC80 && c <= 0xDCFF) {
            b[0] = (unsigned char)(c - 0xDC00), k = 1;
        } else if (c >= 0xD800 && c <= 0xDFFF) {
            return 0;
        } else if (c < 0x80) {
            b[0] = (unsigned char)c, k = 1;
        } else if (c < 0x800) {
            b[0] = (unsigned char)(0xC0 | (c >> 6)), b[1] = (unsigned char)(0x80 | (c & 0x3F));
            k = 2;
        } else if (c < 0x10000) {
            b[0] = (unsigned char)(0xE0 | (c >> 12));
            b[1] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            b[2] = (unsigned char)(0x80 | (c & 0x3F));
            k = 3;
        } else {
            b[0] = (unsigned char)(0xF0 | (c >> 18));
            b[1] = (unsigned char)(0x80 | ((c >> 12) & 0x3F));
            b[2] = (unsigned char)(0x80 | ((c >> 6) & 0x3F));
            b[3] = (unsigned char)(0x80 | (c & 0x3F));
            k = 4;
        }
        buf_add(out, b, k);
    }
    return 1;
}

/* --- the JSON scanner: what shim.decode_object() accepts, and two top-level values -------
 *
 * It mirrors CPython's C scanner (_json.c) as shim.py drives it: strict strings (no raw
 * control characters), NaN / Infinity / -Infinity accepted, the number grammar of
 * _match_number, Python's whitespace around the object, and the two limits of the
 * interpreter the launchers run on, measured at build time: nesting deeper than
 * PYCNI_JSON_MAX_DEPTH (RecursionError) and integers longer than PYCNI_INT_MAX_DIGITS digits
 * (ValueError) make the whole config "not an object". It never recurses. */

enum { ABSENT = 0, STRING = 1, OTHER = 2 };

struct value {
    int kind;  /* of the last top-level occurrence of the key */
    size_t at; /* STRING: offset of its opening quote */
};

struct scan {
    const unsigned char *s;
    size_t len;
    int syntax_ok;    /* a JSON object, whitespace around it, within the digit limit */
    long max_depth;   /* deepest nesting seen (the top-level object is 1) */
    struct value socket, version;
};

static int is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static int hex4(const unsigned char *s, uint32_t *out)
{
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned char c = s[k];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (uint32_t)(c - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

/* The JSON string whose opening quote is at s[i]: the offset after its closing quote, or 0 if
 * it is invalid. Its code points go to out[0..cap) and their count to *n (when out given). */
static size_t scan_string(const struct scan *sc, size_t i, uint32_t *out, size_t cap,
                          size_t *n)
{
    const unsigned char *s = sc->s;
    size_t len = sc->len, count = 0, j = i + 1;
    for (;;) {
        if (j >= len)
            return 0; /* unterminated */
        unsigned char c = s[j];
        uint32_t cp;
        if (c == '"') {
            j++;
            break;
        }
        if (c < 0x20)
            return 0; /* a raw control character: strict */
        if (c != '\\') {
            size_t k = utf8_next(s, len, j, &cp); /* the input was validated: k >= 1 */
            if (k == 0)
                return 0;
            j += k;
        } else {
            if (++j >= len)
                return 0;
            c = s[j++];
            switch (c) {
            case '"': cp = '"'; break;
            case '\\': cp = '\\'; break;
            case '/': cp = '/'; break;
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'n': cp = '\n'; break;
            case 'r': cp = '\r'; break;
            case 't': cp = '\t'; break;
            case 'u':
                /* four hex digits and something after them (_json: end >= len fails) */
                if (len - j < 5 || !hex4(s + j, &cp))
                    return 0;
                j += 4;
                if (cp >= 0xD800 && cp <= 0xDBFF && len - j >= 7 && s[j] == '\\' &&
                    s[j + 1] == 'u') {
                    uint32_t low;
                    if (hex4(s + j + 2, &low) && low >= 0xDC00 && low <= 0xDFFF) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                        j += 6;
                    }
                    /* else: a lone high surrogate; the next escape is read on its own */
                }
                break;
            default:
                return 0;
            }
        }
        if (out != NULL && count < cap)
            out[count] = cp;
        count++;
    }
    if (n != NULL)
        *n = count;
    return j;
}

/* The number at s[i] as _match_number reads it: the offset after it, or 0. */
static size_t scan_number(const struct scan *sc, size_t i)
{
    const unsigned char *s = sc->s;
    size_t len = sc->len, j = i;
    int is_float = 0;
    if (s[j] == '-' && ++j >= len)
        return 0;
    size_t digits_from = j;
    if (s[j] >= '1' && s[j] <= '9') {
        j++;
        while (j < len && is_digit(s[j]))
            j++;
    } else if (s[j] == '0') {
        j++;
    } else {
        return 0;
    }
    size_t int_digits = j - digits_from;
    if (j + 1 < len && s[j] == '.' && is_digit(s[j + 1])) {
        is_float = 1;
        j += 2;
        while (j < len && is_digit(s[j]))
            j++;
    }
    if (j + 1 < len && (s[j] == 'e' || s[j] == 'E')) {
        size_t e = j++;
        if (j + 1 < len && (s[j] == '-' || s[j] == '+'))
            j++;
        while (j < len && is_digit(s[j]))
            j++;
        if (is_digit(s[j - 1]))
            is_float = 1;
        else
            j = e; /* no exponent after all */
    }
    if (!is_float && PYCNI_INT_MAX_DIGITS > 0 && int_digits > (size_t)PYCNI_INT_MAX_DIGITS)
        return 0; /* int() refuses it */
    return j;
}

static int word_at(const struct scan *sc, size_t i, const char *word)
{
    size_t n = strlen(word);
    return sc->len - i >= n && memcmp(sc->s + i, word, n) == 0;
}

static size_t skip_ws(const struct scan *sc, size_t i)
{
    while (i < sc->len && (sc->s[i] == ' ' || sc->s[i] == '\t' || sc->s[i] == '\n' ||
                           sc->s[i] == '\r'))
        i++;
    return i;
}

static int key_is(const struct scan *sc, size_t at, const char *name)
{
    uint32_t cps[16];
    size_t n, want = strlen(name);
    if (scan_string(sc, at, cps, 16, &n) == 0 || n != want)
        return 0;
    for (size_t k = 0; k < n; k++)
        if (cps[k] != (unsigned char)name[k])
            return 0;
    return 1;
}

/* Scan the whole input once: syntax, nesting depth, and the two top-level values. */
static void scan_config(struct scan *sc)
{
    const unsigned char *s = sc->s;
    size_t len = sc->len, i = 0;
    uint32_t cp;
    sc->syntax_ok = 0;
    sc->max_depth = 0;
    sc->socket.kind = sc->version.kind = ABSENT;
    if (!utf8_valid(s, len))
        return; /* data.decode() fails */
    while (i < len) { /* text.lstrip() */
        size_t k = utf8_next(s, len, i, &cp);
        if (!py_isspace(cp))
            break;
        i += k;
    }
    if (i >= len || s[i] != '{')
        return; /* not an object (or no JSON at all) */

    /* The open containers: 1 = object, 2 = array; never deeper than Python goes. */
    long limit = PYCNI_JSON_MAX_DEPTH;
    if ((unsigned long)limit > len)
        limit = (long)len;
    unsigned char *stack = malloc((size_t)limit + 1);
    if (stack == NULL)
        die_nomem();
    long depth = 0;
    struct value *pending = NULL; /* the top-level key whose value comes next */

    for (;;) {
        /* a value starts at s[i] */
        if (i >= len)
            goto fail;
        if (depth == 1 && pending != NULL) {
            pending->kind = s[i] == '"' ? STRING : OTHER;
            pending->at = i;
        }
        pending = NULL;
        unsigned char c = s[i];
        if (c == '{' || c == '[') {
            if (depth >= limit) {
                sc->max_depth = depth + 1;
                goto fail; /* RecursionError */
            }
            stack[depth++] = c == '{' ? 1 : 2;
            if (depth > sc->max_depth)
                sc->max_depth = depth;
            i = skip_ws(sc, i + 1);
            if (i < len && s[i] == (c == '{' ? '}' : ']')) {
                depth--;
                i++;
                goto after_value;
            }
            if (c == '[')
                continue;
            goto key;
        } else if (c == '"') {
            if ((i = scan_string(sc, i, NULL, 0, NULL)) == 0)
                goto fail;
        } else if (c == 'n' && word_at(sc, i, "null")) {
            i += 4;
        } else if (c == 't' && word_at(sc, i, "true")) {
            i += 4;
        } else if (c == 'f' && word_at(sc, i, "false")) {
            i += 5;
        } else if (c == 'N' && word_at(sc, i, "NaN")) {
            i += 3;
        } else if (c == 'I' && word_at(sc, i, "Infinity")) {
            i += 8;
        } else if (c == '-' && word_at(sc, i, "-Infinity")) {
            i += 9;
        } else if ((i = scan_number(sc, i)) == 0) {
            goto fail;
        }

    after_value:
        if (depth == 0)
            break;
        i = skip_ws(sc, i);
        if (i >= len)
            goto fail;
        if (s[i] == (stack[depth - 1] == 1 ? '}' : ']')) {
            depth--;
            i++;
            goto after_value;
        }
        if (s[i] != ',')
            goto fail;
        i = skip_ws(sc, i + 1);
        if (stack[depth - 1] == 2) {
            if (i < len && s[i] == ']')
                goto fail; /* trailing comma */
            continue;
        }
        /* fall through to the next key of an object (a '}' here fails: trailing comma) */

    key:
        if (i >= len || s[i] != '"')
            goto fail;
        {
            size_t end = scan_string(sc, i, NULL, 0, NULL);
            if (end == 0)
                goto fail;
            if (depth == 1) {
                if (key_is(sc, i, "agentSocket"))
                    pending = &sc->socket;
                else if (key_is(sc, i, "cniVersion"))
                    pending = &sc->version;
            }
            i = skip_ws(sc, end);
        }
        if (i >= len || s[i] != ':')
            goto fail;
        i = skip_ws(sc, i + 1);
    }
    free(stack);
    while (i < len) { /* text[end:].strip() must be empty */
        size_t k = utf8_next(s, len, i, &cp);
        if (!py_isspace(cp))
            return;
        i += k;
    }
    sc->syntax_ok = 1;
    return;
fail:
    free(stack);
}

/* Whether decode_object() returns the object when called `frames` Python frames deeper than
 * socket_path's call (each frame uses one level of the interpreter's recursion limit). */
static int object_ok(const struct scan *sc, int frames)
{
    return sc->syntax_ok && sc->max_depth <= (long)PYCNI_JSON_MAX_DEPTH - frames;
}

/* The string value at `at`, as code points (malloc'd; *n of them). */
static uint32_t *decode_value(const struct scan *sc, size_t at, size_t *n)
{
    size_t cap = sc->len - at;
    uint32_t *cps = malloc((cap ? cap : 1) * sizeof *cps);
    if (cps == NULL)
        die_nomem();
    if (scan_string(sc, at, cps, cap, n) == 0)
        *n = 0; /* cannot happen: the scan accepted it */
    return cps;
}

/* --- shim.socket_path() and shim.try_again() --------------------------------------------- */

struct path {
    uint32_t *cps; /* the str: for messages */
    size_t n;
};

static struct path ascii_path(const char *s)
{
    struct path p;
    p.n = strlen(s);
    p.cps = malloc((p.n ? p.n : 1) * sizeof *p.cps);
    if (p.cps == NULL)
        die_nomem();
    for (size_t k = 0; k < p.n; k++)
        p.cps[k] = (unsigned char)s[k];
    return p;
}

static struct path socket_path(const unsigned char *in, size_t len, const struct scan *sc)
{
    if (memmem(in, len, CONFIG_KEY, sizeof CONFIG_KEY - 1) == NULL)
        return ascii_path(PYCNI_DEFAULT_SOCKET);
    if (!object_ok(sc, 0) || sc->socket.kind != STRING)
        return ascii_path(PYCNI_DEFAULT_SOCKET); /* a broken config: the default agent */
    struct path p;
    p.cps = decode_value(sc, sc->socket.at, &p.n);
    if (p.n == 0)
        return p; /* "": never use an agent */
    int ok = p.cps[0] == '/';
    for (size_t k = 0; ok && k < p.n; k++)
        ok = p.cps[k] != 0;
    if (!ok) { /* a relative path, or an abstract-namespace one */
        free(p.cps);
        return ascii_path(PYCNI_DEFAULT_SOCKET);
    }
    return p;
}

/* The version an error answers in: the config's cniVersion if pycni speaks it. */
static void answer_version(const struct scan *sc, int frames, char *out, size_t size)
{
    static const char versions[] = PYCNI_VERSIONS; /* comma-separated, the latest last */
    const char *latest = strrchr(versions, ',');
    latest = latest ? latest + 1 : versions;
    snprintf(out, size, "%s", latest);
    if (!object_ok(sc, frames) || sc->version.kind != STRING)
        return;
    size_t n;
    uint32_t *cps = decode_value(sc, sc->version.at, &n);
    for (const char *v = versions; *v;) {
        size_t vlen = strcspn(v, ",");
        int same = vlen == n;
        for (size_t k = 0; same && k < n; k++)
            same = cps[k] == (unsigned char)v[k];
        if (same) {
            snprintf(out, size, "%.*s", (int)vlen, v);
            break;
        }
        v += vlen + (v[vlen] == ',');
    }
    free(cps);
}

/* json.dumps (ensure_ascii) of one code point, inside a string. */
static void json_char(struct buf *b, uint32_t c)
{
    char tmp[16];
    switch (c) {
    case '"': buf_str(b, "\\\""); return;
    case '\\': buf_str(b, "\\\\"); return;
    case '\n': buf_str(b, "\\n"); return;
    case '\r': buf_str(b, "\\r"); return;
    case '\t': buf_str(b, "\\t"); return;
    case '\b': buf_str(b, "\\b"); return;
    case '\f': buf_str(b, "\\f"); return;
    }
    if (c >= 0x20 && c <= 0x7E) {
        unsigned char ch = (unsigned char)c;
        buf_add(b, &ch, 1);
    } else if (c < 0x10000) {
        snprintf(tmp, sizeof tmp, "\\u%04x", (unsigned)c);
        buf_str(b, tmp);
    } else {
        uint32_t v = c - 0x10000;
        snprintf(tmp, sizeof tmp, "\\u%04x\\u%04x", (unsigned)(0xD800 | (v >> 10)),
                 (unsigned)(0xDC00 | (v & 0x3FF)));
        buf_str(b, tmp);
    }
}

static void json_text(struct buf *b, const char *s)
{
    for (; *s; s++)
        json_char(b, (unsigned char)*s);
}

static void json_path(struct buf *b, const struct path *p)
{
    for (size_t k = 0; k < p->n; k++)
        json_char(b, p->cps[k]);
}

/* CNI error 11 as shim.try_again() prints it: `before` + the path + `after` + "; try again". */
static void try_again(struct buf *out, const struct scan *sc, int frames, const char *before,
                      const struct path *p, const char *after)
{
    char version[64];
    answer_version(sc, frames, version, sizeof version);
    buf_str(out, "{\"cniVersion\": \"");
    json_text(out, version);
    buf_str(out, "\", \"code\": 11, \"msg\": \"");
    json_text(out, before);
    if (p != NULL)
        json_path(out, p);
    json_text(out, after);
    json_text(out, "; try again");
    buf_str(out, "\"}\n");
}

/* --- shim.call_agent() --------------------------------------------------------------------- */

enum { NO_AGENT = -1, HUNG_AGENT = -2 };

static int has_forwarded_prefix(const char *entry)
{
    static const char prefixes[] = PYCNI_FORWARDED; /* comma-separated */
    for (const char *p = prefixes; *p;) {
        size_t n = strcspn(p, ",");
        if (n > 0 && strncmp(entry, p, n) == 0)
            return 1;
        p += n + (p[n] == ',');
    }
    return 0;
}

/* os.environb's forwarded entries, NUL-joined: the first of duplicate keys, as Python keeps. */
static void forwarded_env(struct buf *env)
{
    size_t kept = 0;
    for (char **e = environ; e != NULL && *e != NULL; e++) {
        const char *eq = strchr(*e, '=');
        if (eq == NULL)
            continue;
        size_t klen = (size_t)(eq - *e) + 1; /* with the '=' */
        if (!has_forwarded_prefix(*e))
            continue;
        int seen = 0;
        for (char **f = environ; f != e && !seen; f++) {
            const char *feq = strchr(*f, '=');
            seen = feq != NULL && (size_t)(feq - *f) + 1 == klen && strncmp(*f, *e, klen) == 0;
        }
        if (seen)
            continue;
        if (kept++)
            buf_add(env, "", 1);
        buf_str(env, *e);
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void set_timeout(int fd, int option, double seconds)
{
    struct timeval tv;
    if (seconds < 0.001)
        seconds = 0.001; /* 0 would mean "never" */
    tv.tv_sec = (time_t)seconds;
    tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
    setsockopt(fd, SOL_SOCKET, option, &tv, sizeof tv);
}

/* str(OSError) for an errno, as Python words it. */
static void errno_text(char *out, size_t size, int err)
{
    if (err == EAGAIN || err == EWOULDBLOCK)
        snprintf(out, size, "timed out"); /* socket.timeout */
    else
        snprintf(out, size, "[Errno %d] %s", err, strerror(err));
}

/* Connect to the agent at `p`: the socket, NO_AGENT when nobody of ours listens there, or
 * HUNG_AGENT when its listen backlog stayed full for the whole connect timeout. */
static int connect_agent(const struct path *p)
{
    struct buf bytes = {0};
    if (!encode_fs(p->cps, p->n, &bytes)) {
        free(bytes.data);
        return NO_AGENT; /* no socket can have that name */
    }
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (bytes.len > sizeof addr.sun_path) {
        free(bytes.data);
        return NO_AGENT; /* "AF_UNIX path too long" */
    }
    memcpy(addr.sun_path, bytes.data, bytes.len);
    socklen_t addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + bytes.len);
    free(bytes.data);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NO_AGENT;
    /* A blocking connect() to a unix socket waits for room in the backlog as long as
     * SO_SNDTIMEO says (for ever by default), then fails with EAGAIN. */
    set_timeout(fd, SO_SNDTIMEO, PYCNI_CONNECT_TIMEOUT_MS / 1000.0);
    int rc;
    do
        rc = connect(fd, (struct sockaddr *)&addr, addrlen);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        int hung = errno == EAGAIN;
        close(fd);
        return hung ? HUNG_AGENT : NO_AGENT; /* else no socket, or a stale one */
    }
    struct ucred cred;
    socklen_t credlen = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) < 0 ||
        (cred.uid != 0 && cred.uid != geteuid())) {
        close(fd);
        return NO_AGENT; /* not an agent of ours (a squatted path) */
    }
    return fd;
}

/* Send the request, read the whole answer; (status, stdout bytes) in *status and *out, or a
 * "try again" error there when the agent went away. */
static void call_agent(int fd, const struct path *p, const unsigned char *in, size_t len,
                       const struct scan *sc, int *status, struct buf *out)
{
    struct buf env = {0}, req = {0}, reply = {0};
    char head[96], why[160];
    forwarded_env(&env);
    snprintf(head, sizeof head, "%s CNI %zu %zu\n", PYCNI_MAGIC, env.len, len);
    buf_str(&req, head);
    buf_add(&req, env.data, env.len);
    buf_add(&req, in, len);
    free(env.data);

    double timeout = PYCNI_TIMEOUT_MS / 1000.0, deadline = now() + timeout;
    int lost = 0;
    /* sendall(): one deadline for the whole request */
    for (size_t sent = 0; sent < req.len;) {
        set_timeout(fd, SO_SNDTIMEO, deadline - now());
        ssize_t n = send(fd, req.data + sent, req.len - sent, MSG_NOSIGNAL);
        if (n >= 0) {
            sent += (size_t)n;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EPIPE || errno == ECONNRESET)
            break; /* it answered without reading everything (a refusal): read that answer */
        errno_text(why, sizeof why, errno); /* EAGAIN: the deadline passed */
        lost = 1;
        break;
    }
    free(req.data);
    /* recv() until the agent closes: each read gets the whole timeout */
    set_timeout(fd, SO_RCVTIMEO, timeout);
    while (!lost) {
        buf_reserve(&reply, 65536);
        ssize_t n = recv(fd, reply.data + reply.len, reply.cap - reply.len, 0);
        if (n > 0) {
            reply.len += (size_t)n;
            continue;
        }
        if (n == 0)
            break;
        if (errno == EINTR)
            continue;
        /* A reset after the answer (the agent closed with the request unread) ends the
         * answer; before any of it, the agent is lost. */
        if (errno == ECONNRESET && reply.len > 0)
            break;
        errno_text(why, sizeof why, errno);
        lost = 1;
    }
    close(fd);
    if (lost) {
        char after[200];
        snprintf(after, sizeof after, ": %s", why);
        *status = 1;
        try_again(out, sc, 1, "lost the pycni agent at ", p, after);
        free(reply.data);
        return;
    }
    /* "<status>\n<stdout bytes>" */
    unsigned char *nl = reply.len ? memchr(reply.data, '\n', reply.len) : NULL;
    size_t hlen = nl ? (size_t)(nl - reply.data) : 0;
    int digits = nl != NULL && hlen > 0;
    for (size_t k = 0; digits && k < hlen; k++)
        digits = is_digit(reply.data[k]);
    if (!digits) {
        *status = 1;
        try_again(out, sc, 1, "the pycni agent at ", p, " went away before answering");
        free(reply.data);
        return;
    }
    if (PYCNI_INT_MAX_DIGITS > 0 && hlen > (size_t)PYCNI_INT_MAX_DIGITS) {
        *status = 1; /* int() refuses it: Python dies of a ValueError, printing nothing */
        free(reply.data);
        return;
    }
    /* sys.exit(int): the low byte, or 255 beyond a C long */
    unsigned long long value = 0;
    int overflow = 0;
    for (size_t k = 0; k < hlen; k++) {
        unsigned d = (unsigned)(reply.data[k] - '0');
        if (value > (0x7FFFFFFFFFFFFFFFULL - d) / 10)
            overflow = 1;
        else
            value = value * 10 + d;
    }
    *status = overflow ? 255 : (int)(value & 0xFF);
    buf_add(out, nl + 1, reply.len - hlen - 1);
    free(reply.data);
}

/* --- without an agent ------------------------------------------------------------------------ */

#ifdef PYCNI_FALLBACK
/* The in-process launcher, on the same stdin bytes (in an unnamed file) and environment. */
static void exec_fallback(char **argv, const unsigned char *in, size_t len, const struct scan *sc,
                          struct buf *out)
{
    static const char fallback[] = PYCNI_FALLBACK;
    int fd = memfd_create("pycni-stdin", MFD_CLOEXEC);
    if (fd < 0)
        fd = open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    int err = fd < 0 ? errno : 0;
    for (size_t done = 0; fd >= 0 && done < len;) {
        ssize_t n = write(fd, in + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            err = n < 0 ? errno : EIO;
            break;
        }
        done += (size_t)n;
    }
    if (fd >= 0) {
        if (!err && (lseek(fd, 0, SEEK_SET) != 0 || dup2(fd, 0) < 0))
            err = errno;
        close(fd);
    }
    if (!err) {
        char *fallback_argv[] = {(char *)fallback, NULL};
        execv(fallback, argv[0] != NULL ? argv : fallback_argv);
        err = errno;
    }
    char why[160], after[200];
    errno_text(why, sizeof why, err);
    snprintf(after, sizeof after, " cannot run: %s", why);
    struct path p = ascii_path(fallback);
    try_again(out, sc, 0, "no pycni agent is listening, and pycni's in-process launcher ", &p,
              after);
    free(p.cps);
}
#endif

/* --- main -------------------------------------------------------------------------------------- */

static void write_all(const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            exit(1); /* stdout closed: Python's BrokenPipeError */
        p += w;
        n -= (size_t)w;
    }
}

int main(int argc, char **argv)
{
    (void)argc;
    struct buf in = {0}, out = {0};
    /* stdin: b"" on a terminal, else up to one byte past the limit (the core reports it) */
    if (!isatty(0)) {
        const size_t limit = (size_t)PYCNI_MAX_CONFIG_BYTES + 1;
        while (in.len < limit) {
            buf_reserve(&in, in.len < 65536 ? 65536 : in.len);
            size_t room = in.cap - in.len;
            ssize_t n = read(0, in.data + in.len, room < limit - in.len ? room : limit - in.len);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0) {
                fprintf(stderr, "pycni: cannot read the network config: %s\n", strerror(errno));
                return 1;
            }
            if (n == 0)
                break;
            in.len += (size_t)n;
        }
    }
    struct scan sc;
    sc.s = in.data ? in.data : (const unsigned char *)"";
    sc.len = in.len;
    scan_config(&sc);
    struct path p = socket_path(sc.s, sc.len, &sc);
    int status = 1;
    int fd = p.n > 0 ? connect_agent(&p) : NO_AGENT;
    if (fd == HUNG_AGENT) {
        /* shim.hung_message(): never the fallback, the agent may resume this very call */
        char after[160];
        snprintf(after, sizeof after, " accepted no connection within %g s (hung, or swamped)",
                 PYCNI_CONNECT_TIMEOUT_MS / 1000.0);
        try_again(&out, &sc, 1, "the pycni agent at ", &p, after);
    } else if (fd != NO_AGENT) {
        call_agent(fd, &p, sc.s, sc.len, &sc, &status, &out);
    } else {
#ifdef PYCNI_FALLBACK
        exec_fallback(argv, sc.s, sc.len, &sc, &out);
#else
        (void)argv;
        static const char hint[] = ": this node's pycni executable is the standalone launcher, "
                                   "which needs the node agent (is the pycni pod running on "
                                   "this node?)";
        if (p.n > 0)
            try_again(&out, &sc, 0, "no pycni agent is listening at ", &p, hint);
        else
            try_again(&out, &sc, 0,
                      "no pycni agent is listening (the config sets \"agentSocket\": \"\")",
                      NULL, hint);
#endif
    }
    signal(SIGPIPE, SIG_IGN); /* as Python: a closed stdout is an error, not a signal */
    if (out.len)
        write_all(out.data, out.len);
    free(out.data);
    free(in.data);
    free(p.cps);
    return status;
}
