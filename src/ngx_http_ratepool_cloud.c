
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool.h"
#include "ngx_http_ratepool_body.h"
#include "ngx_http_ratepool_cloud.h"
#include "ngx_http_ratepool_filter.h"
#include "ngx_http_ratepool_token.h"
#include "ratepool_dialect.h"
#include "ratepool_eventstream.h"
#include "ratepool_request.h"
#include "ratepool_sigv4.h"


/*
 * A try's request, built for its key's service: as the client sent it,
 * or, for Amazon Bedrock's Messages API, at its path, with the model as
 * Bedrock names it, and signed (SigV4) over the exact bytes sent.  The
 * client's body is never changed: a try that rewrites it gets a chain of
 * its own, of pieces of a copy of it in memory, so that every try, to
 * whichever service, starts from what the client sent.
 */


#define RATEPOOL_BEDROCK_PATH  "/anthropic/v1/messages"
#define RATEPOOL_MESSAGE_MAX   1024
#define RATEPOOL_MEMBERS_MAX   64       /* Anthropic's API has some 20 */
#define RATEPOOL_FRAME_MAX     65536    /* a Bedrock event is a few KB */


typedef struct {
    ngx_http_request_t        *request;
    ngx_http_ratepool_ctx_t   *ctx;
    ngx_chain_t              **ll;
} ngx_http_ratepool_sse_out_t;


static ngx_int_t ngx_http_ratepool_bedrock_body(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t **body, off_t *len);
static ngx_int_t ngx_http_ratepool_body_copy(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx);
static ngx_int_t ngx_http_ratepool_invoke_body(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t **body, off_t *len);
static ngx_int_t ngx_http_ratepool_invoke_betas(ngx_http_request_t *r,
    ngx_chain_t ***ll, off_t *total);
static ngx_int_t ngx_http_ratepool_invoke_path(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_str_t *path, ngx_str_t *canonical);
static ngx_int_t ngx_http_ratepool_vertex_path(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_str_t *path);
static u_char *ngx_http_ratepool_aws_escape(u_char *dst, u_char *src,
    size_t len);
static ngx_int_t ngx_http_ratepool_sign(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t *body, ngx_str_t *path);
static ngx_int_t ngx_http_ratepool_request_line(ngx_http_request_t *r,
    ngx_str_t *path);
static ngx_int_t ngx_http_ratepool_piece(ngx_pool_t *pool, u_char *from,
    u_char *to, ngx_chain_t ***ll);
static int ngx_http_ratepool_frame(void *data, int kind, const u_char *type,
    size_t type_len, const u_char *payload, size_t len);
static ngx_buf_t *ngx_http_ratepool_sse_buf(ngx_http_ratepool_sse_out_t *o,
    size_t size);


ngx_int_t
ngx_http_ratepool_build_request(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    off_t                     len;
    ngx_int_t                 rc;
    ngx_str_t                 path, canonical;
    ngx_chain_t              *body;
    ngx_http_upstream_t      *u;
    ngx_http_ratepool_key_t  *key;

    u = r->upstream;
    key = ctx->key;

    if (ctx->body_length == -1) {
        ctx->body_length = r->headers_in.content_length_n;
    }

    if (key->provider->service == RATEPOOL_SERVICE_DIRECT) {
        /* the client's request, under this key's headers */
        u->request_bufs = r->request_body ? r->request_body->bufs : NULL;
        r->headers_in.content_length_n = ctx->body_length;
        ngx_str_null(&ctx->signed_auth);

        return u->create_request(r);
    }

    if (key->provider->service == RATEPOOL_SERVICE_INVOKE) {
        rc = ngx_http_ratepool_invoke_body(r, ctx, &body, &len);

        if (rc == NGX_OK) {
            rc = ngx_http_ratepool_invoke_path(r, ctx, &path, &canonical);
        }

    } else if (key->provider->service == RATEPOOL_SERVICE_VERTEX) {
        rc = ngx_http_ratepool_invoke_body(r, ctx, &body, &len);

        if (rc == NGX_OK) {
            rc = ngx_http_ratepool_vertex_path(r, ctx, &path);
        }

        if (rc == NGX_OK) {
            rc = ngx_http_ratepool_token_header(r, ctx);
        }

        canonical = path;

    } else {
        rc = ngx_http_ratepool_bedrock_body(r, ctx, &body, &len);
        ngx_str_set(&path, RATEPOOL_BEDROCK_PATH);
        canonical = path;
    }

    if (rc != NGX_OK) {
        return NGX_ERROR;
    }

    u->request_bufs = body;
    r->headers_in.content_length_n = len;

    if (key->credential == RATEPOOL_CREDENTIAL_SIGV4
        && ngx_http_ratepool_sign(r, ctx, body, &canonical) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (u->create_request(r) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_ratepool_request_line(r, &path);
}


/*
 * InvokeModel's body: the client's members but "model" and "stream"
 * (the path says both), after Bedrock's "anthropic_version"; Vertex AI's
 * the same with "stream" kept and its own "anthropic_version".
 */

static ngx_int_t
ngx_http_ratepool_invoke_body(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t **body, off_t *len)
{
    int                 n, i;
    u_char             *start;
    off_t               total;
    ngx_chain_t        *out, **ll;
    ratepool_member_t   members[RATEPOOL_MEMBERS_MAX], *m;

    ngx_uint_t  vertex;
    u_char     *head;
    size_t      head_len;

    static u_char  bedrock[] = "{\"anthropic_version\":\"bedrock-2023-05-31\"";
    static u_char  google[] = "{\"anthropic_version\":\"vertex-2023-10-16\"";
    static u_char  comma[] = ",";
    static u_char  tail[] = "}";

    vertex = (ctx->key->provider->service == RATEPOOL_SERVICE_VERTEX);
    head = vertex ? google : bedrock;
    head_len = vertex ? sizeof(google) - 1 : sizeof(bedrock) - 1;

    if (ngx_http_ratepool_body_copy(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    start = ctx->body_copy->pos;

    n = ratepool_json_members(start, ctx->body_copy->last - start, members,
                              RATEPOOL_MEMBERS_MAX);

    if (n < 0) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "ratepool: a request body with more than %d members "
                      "cannot go to bedrock's invokemodel",
                      RATEPOOL_MEMBERS_MAX);
        return NGX_ERROR;
    }

    out = NULL;
    ll = &out;

    total = 0;

    if (ngx_http_ratepool_piece(r->pool, head, head + head_len, &ll)
        != NGX_OK
        || (!vertex
            && ngx_http_ratepool_invoke_betas(r, &ll, &total) != NGX_OK))
    {
        return NGX_ERROR;
    }

    total += head_len + 1;

    for (i = 0; i < n; i++) {
        m = &members[i];

        if ((m->key_len == 5
             && ngx_strncmp(start + m->start + 1, "model", 5) == 0)
            || (!vertex && m->key_len == 6
                && ngx_strncmp(start + m->start + 1, "stream", 6) == 0))
        {
            continue;
        }

        if (ngx_http_ratepool_piece(r->pool, comma, comma + 1, &ll)
                != NGX_OK
            || ngx_http_ratepool_piece(r->pool, start + m->start,
                                       start + m->end, &ll)
               != NGX_OK)
        {
            return NGX_ERROR;
        }

        total += 1 + (off_t) (m->end - m->start);
    }

    if (ngx_http_ratepool_piece(r->pool, tail, tail + 1, &ll) != NGX_OK) {
        return NGX_ERROR;
    }

    *body = out;
    *len = total;

    return NGX_OK;
}


/*
 * The client's anthropic-beta flags that ratepool_bedrock_betas lets
 * through, as InvokeModel's "anthropic_beta" member; the others are left
 * out, as Bedrock would refuse the request for them.
 */

static ngx_int_t
ngx_http_ratepool_invoke_betas(ngx_http_request_t *r, ngx_chain_t ***ll,
    off_t *total)
{
    u_char                         *p, *start, *end, *next, *list, *o;
    ngx_str_t                      *header, *flags;
    ngx_uint_t                      i, n;
    ngx_http_ratepool_main_conf_t  *rmcf;

    static ngx_str_t  name = ngx_string("anthropic-beta");

    *total = 0;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);
    header = ngx_http_ratepool_header_in(r, &name);

    if (header == NULL || rmcf->bedrock_betas.nelts == 0) {
        return NGX_OK;
    }

    flags = rmcf->bedrock_betas.elts;

    list = ngx_pnalloc(r->pool, sizeof(",\"anthropic_beta\":[]") - 1
                                + 3 * header->len);
    if (list == NULL) {
        return NGX_ERROR;
    }

    o = ngx_cpymem(list, ",\"anthropic_beta\":[",
                   sizeof(",\"anthropic_beta\":[") - 1);
    n = 0;

    end = header->data + header->len;

    for (p = header->data; p < end; p = next + 1) {
        next = ngx_strlchr(p, end, ',');
        if (next == NULL) {
            next = end;
        }

        start = p;

        while (start < next && *start == ' ') {
            start++;
        }

        for (i = 0; i < rmcf->bedrock_betas.nelts; i++) {
            if (flags[i].len == (size_t) (next - start)
                && ngx_strncmp(flags[i].data, start, flags[i].len) == 0)
            {
                if (n++) {
                    *o++ = ',';
                }

                *o++ = '"';
                o = ngx_cpymem(o, flags[i].data, flags[i].len);
                *o++ = '"';
                break;
            }
        }
    }

    if (n == 0) {
        return NGX_OK;
    }

    *o++ = ']';
    *total = o - list;

    return ngx_http_ratepool_piece(r->pool, list, o, ll);
}


/*
 * "/model/{id}/invoke" or "/invoke-with-response-stream": the model id
 * escaped in the path sent, and escaped again in the path signed, as
 * SigV4 wants of every service but S3 (a ":" is "%3A", then "%253A").
 */

static ngx_int_t
ngx_http_ratepool_invoke_path(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_str_t *path, ngx_str_t *canonical)
{
    size_t      len;
    u_char     *p;
    ngx_str_t  *id, action;

    id = &ctx->cloud_model->bedrock;

    if (ctx->stream) {
        ngx_str_set(&action, "/invoke-with-response-stream");

    } else {
        ngx_str_set(&action, "/invoke");
    }

    len = sizeof("/model/") - 1 + 3 * id->len + action.len;

    path->data = ngx_pnalloc(r->pool, len);
    canonical->data = ngx_pnalloc(r->pool, 3 * len);

    if (path->data == NULL || canonical->data == NULL) {
        return NGX_ERROR;
    }

    p = ngx_cpymem(path->data, "/model/", sizeof("/model/") - 1);
    p = ngx_http_ratepool_aws_escape(p, id->data, id->len);
    p = ngx_cpymem(p, action.data, action.len);
    path->len = p - path->data;

    /* the path as sent, escaped once more, its slashes kept */

    p = canonical->data;

    for (len = 0; len < path->len; len++) {
        if (path->data[len] == '/') {
            *p++ = '/';

        } else {
            p = ngx_http_ratepool_aws_escape(p, &path->data[len], 1);
        }
    }

    canonical->len = p - canonical->data;

    return NGX_OK;
}


/*
 * Vertex AI's ".../projects/P/locations/R/publishers/anthropic/models/M"
 * and ":rawPredict", or ":streamRawPredict" for a stream.
 */

static ngx_int_t
ngx_http_ratepool_vertex_path(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_str_t *path)
{
    size_t                    len;
    ngx_str_t                *id;
    ngx_http_ratepool_key_t  *key;

    key = ctx->key;
    id = &ctx->cloud_model->vertex;

    len = sizeof("/v1/projects//locations//publishers/anthropic/models/"
                 ":streamRawPredict") - 1
          + key->project.len + key->region.len + 3 * id->len;

    path->data = ngx_pnalloc(r->pool, len);
    if (path->data == NULL) {
        return NGX_ERROR;
    }

    path->len = ngx_sprintf(path->data, "/v1/projects/%V/locations/%V/"
                            "publishers/anthropic/models/", &key->project,
                            &key->region)
                - path->data;

    path->len = ngx_http_ratepool_aws_escape(path->data + path->len,
                                             id->data, id->len)
                - path->data;

    path->len = ngx_sprintf(path->data + path->len, "%s",
                            ctx->stream ? ":streamRawPredict" : ":rawPredict")
                - path->data;

    return NGX_OK;
}


/* every byte but RFC 3986's unreserved ones as %XX, as AWS escapes */

static u_char *
ngx_http_ratepool_aws_escape(u_char *dst, u_char *src, size_t len)
{
    u_char  c;

    static u_char  hex[] = "0123456789ABCDEF";

    while (len--) {
        c = *src++;

        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
            || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_'
            || c == '~')
        {
            *dst++ = c;
            continue;
        }

        *dst++ = '%';
        *dst++ = hex[c >> 4];
        *dst++ = hex[c & 0xf];
    }

    return dst;
}


/* the body with Bedrock's name for the model in place of the client's */

static ngx_int_t
ngx_http_ratepool_bedrock_body(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t **body, off_t *len)
{
    u_char       *id, *start;
    size_t        n;
    ngx_str_t    *name;
    ngx_chain_t  *out, **ll;

    if (ngx_http_ratepool_body_copy(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    start = ctx->body_copy->pos;

    if (ctx->model_end > ctx->body_copy->last - start) {
        return NGX_ERROR;
    }

    name = &ctx->cloud_model->bedrock;
    n = name->len + 2;

    id = ngx_pnalloc(r->pool, n);
    if (id == NULL) {
        return NGX_ERROR;
    }

    id[0] = '"';
    ngx_memcpy(id + 1, name->data, name->len);
    id[n - 1] = '"';

    out = NULL;
    ll = &out;

    if (ngx_http_ratepool_piece(r->pool, start, start + ctx->model_at, &ll)
            != NGX_OK
        || ngx_http_ratepool_piece(r->pool, id, id + n, &ll) != NGX_OK
        || ngx_http_ratepool_piece(r->pool, start + ctx->model_end,
                                   ctx->body_copy->last, &ll)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    *body = out;
    *len = (ctx->body_copy->last - start) - (ctx->model_end - ctx->model_at)
           + (off_t) n;

    return NGX_OK;
}


/*
 * A memory buffer of its own for each piece, so that a re-send, which
 * rewinds each buffer to its start, sends each from its beginning.  An
 * empty piece is left out: nginx takes an empty buffer for a bug.
 */

static ngx_int_t
ngx_http_ratepool_piece(ngx_pool_t *pool, u_char *from, u_char *to,
    ngx_chain_t ***ll)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    if (from == to) {
        return NGX_OK;
    }

    b = ngx_calloc_buf(pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    cl = ngx_alloc_chain_link(pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    b->memory = 1;
    b->start = from;
    b->pos = from;
    b->last = to;
    b->end = to;

    cl->buf = b;
    cl->next = NULL;

    **ll = cl;
    *ll = &cl->next;

    return NGX_OK;
}


/*
 * The client's body, whole, in one buffer: copied once a request, from
 * the buffers it arrived in or the temporary file a large one went to
 * (read as the body scanner read it, a moment after nginx wrote it).
 */

static ngx_int_t
ngx_http_ratepool_body_copy(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    off_t         size;
    ssize_t       n;
    ngx_buf_t    *b, *copy;
    ngx_chain_t  *cl;

    if (ctx->body_copy) {
        return NGX_OK;
    }

    size = 0;

    for (cl = r->request_body ? r->request_body->bufs : NULL;
         cl;
         cl = cl->next)
    {
        b = cl->buf;
        size += ngx_buf_in_memory(b) ? b->last - b->pos
                                     : b->file_last - b->file_pos;
    }

    copy = ngx_create_temp_buf(r->pool, (size_t) ngx_max(size, 1));
    if (copy == NULL) {
        return NGX_ERROR;
    }

    for (cl = r->request_body ? r->request_body->bufs : NULL;
         cl;
         cl = cl->next)
    {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            copy->last = ngx_cpymem(copy->last, b->pos, b->last - b->pos);
            continue;
        }

        if (!b->in_file) {
            continue;
        }

        n = ngx_read_file(b->file, copy->last,
                          (size_t) (b->file_last - b->file_pos),
                          b->file_pos);

        if (n != b->file_last - b->file_pos) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "ratepool: cannot read the request body back "
                          "from its temporary file");
            return NGX_ERROR;
        }

        copy->last += n;
    }

    ctx->body_copy = copy;

    return NGX_OK;
}


/*
 * AWS Signature Version 4 for this try: the host, the date and, for
 * temporary credentials, the session token are signed, with the SHA-256
 * of the body as it goes out.  The variables ratepool_pass sends as
 * Authorization, X-Amz-Date and X-Amz-Security-Token say what is signed.
 */

static ngx_int_t
ngx_http_ratepool_sign(ngx_http_request_t *r, ngx_http_ratepool_ctx_t *ctx,
    ngx_chain_t *body, ngx_str_t *path)
{
    u_char                          digest[EVP_MAX_MD_SIZE];
    char                            hash[RATEPOOL_SIGV4_HEX_LEN + 1];
    size_t                          len;
    unsigned int                    n;
    ngx_chain_t                    *cl;
    ratepool_sigv4_t                s;
    ngx_http_ratepool_key_t        *key;
    ratepool_sigv4_header_t         h[3];
    ngx_http_ratepool_main_conf_t  *rmcf;

    key = ctx->key;
    rmcf = ngx_http_get_module_main_conf(r, ngx_http_ratepool_module);

    if (EVP_DigestInit_ex(rmcf->sha256_ctx, rmcf->sha256, NULL) != 1) {
        return NGX_ERROR;
    }

    for (cl = body; cl; cl = cl->next) {
        if (EVP_DigestUpdate(rmcf->sha256_ctx, cl->buf->pos,
                             cl->buf->last - cl->buf->pos)
            != 1)
        {
            return NGX_ERROR;
        }
    }

    if (EVP_DigestFinal_ex(rmcf->sha256_ctx, digest, &n) != 1 || n != 32) {
        return NGX_ERROR;
    }

    *ngx_hex_dump((u_char *) hash, digest, 32) = '\0';

    ratepool_sigv4_date(ngx_time(), (char *) ctx->amz_date);

    h[0].name = "host";
    h[0].name_len = 4;
    h[0].value = (char *) key->host.data;
    h[0].value_len = key->host.len;
    h[1].name = "x-amz-date";
    h[1].name_len = 10;
    h[1].value = (char *) ctx->amz_date;
    h[1].value_len = RATEPOOL_AMZ_DATE_LEN;
    h[2].name = "x-amz-security-token";
    h[2].name_len = 20;
    h[2].value = (char *) key->aws_token.data;
    h[2].value_len = key->aws_token.len;

    ngx_memzero(&s, sizeof(ratepool_sigv4_t));
    s.method = "POST";
    s.path = (char *) path->data;
    s.path_len = path->len;
    s.query = "";
    s.headers = h;
    s.nheaders = key->aws_token.len ? 3 : 2;
    s.payload_hex = hash;
    s.date = (char *) ctx->amz_date;
    s.region = (char *) key->region.data;
    s.region_len = key->region.len;
    s.service = "bedrock";
    s.secret = (char *) key->aws_secret.data;
    s.secret_len = key->aws_secret.len;

    len = 256 + key->aws_access_key.len + key->region.len;

    ctx->signed_auth.data = ngx_pnalloc(r->pool, len);
    if (ctx->signed_auth.data == NULL) {
        return NGX_ERROR;
    }

    ctx->signed_auth.len = ratepool_sigv4_authorization(&s,
                                      (char *) key->aws_access_key.data,
                                      key->aws_access_key.len,
                                      (char *) ctx->signed_auth.data, len);

    if (ctx->signed_auth.len == 0) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "ratepool: cannot sign a request for key \"%V\"",
                      &key->name);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* the request line the proxy module built, with the service's path */

static ngx_int_t
ngx_http_ratepool_request_line(ngx_http_request_t *r, ngx_str_t *path)
{
    size_t                len;
    u_char               *eol, *sp;
    ngx_buf_t            *b, *line;
    ngx_http_upstream_t  *u;

    u = r->upstream;

    if (u->request_bufs == NULL) {
        return NGX_ERROR;
    }

    b = u->request_bufs->buf;

    sp = ngx_strlchr(b->pos, b->last, ' ');
    eol = ngx_strlchr(b->pos, b->last, '\n');

    if (sp == NULL || eol == NULL || sp > eol) {
        return NGX_ERROR;
    }

    len = (sp - b->pos) + 1 + path->len
          + sizeof(" HTTP/1.1" CRLF) - 1 + (b->last - (eol + 1));

    line = ngx_create_temp_buf(r->pool, len);
    if (line == NULL) {
        return NGX_ERROR;
    }

    line->last = ngx_cpymem(line->last, b->pos, sp - b->pos + 1);
    line->last = ngx_cpymem(line->last, path->data, path->len);
    line->last = ngx_cpymem(line->last, " HTTP/1.1" CRLF,
                            sizeof(" HTTP/1.1" CRLF) - 1);
    line->last = ngx_cpymem(line->last, eol + 1, b->last - (eol + 1));

    u->request_bufs->buf = line;

    return NGX_OK;
}


/*
 * A cloud's error answer is in its own shape ({"message": ...}), which
 * the client, speaking Anthropic's API, does not read: its text, from
 * what of the body came with the headers, goes into an answer of
 * Anthropic's shape (ngx_http_ratepool_reply_cloud_error()).
 */

ngx_int_t
ngx_http_ratepool_cloud_message(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    u_char               *text;
    size_t                n;
    ngx_http_upstream_t  *u;

    ngx_str_null(&ctx->cloud_message);

    if (ctx->key->provider->service == RATEPOOL_SERVICE_DIRECT) {
        return NGX_OK;
    }

    u = r->upstream;

    text = ngx_pnalloc(r->pool, RATEPOOL_MESSAGE_MAX);
    if (text == NULL) {
        return NGX_ERROR;
    }

    n = ratepool_error_message(u->buffer.pos, u->buffer.last - u->buffer.pos,
                               text, RATEPOOL_MESSAGE_MAX);

    ctx->cloud_message.data = text;
    ctx->cloud_message.len = n;

    return NGX_OK;
}


/*
 * Bedrock's InvokeModelWithResponseStream answers an event stream: the
 * client, which asked Anthropic's API for SSE, gets SSE.
 */

ngx_int_t
ngx_http_ratepool_cloud_stream(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx)
{
    u_char                  *buf;
    ratepool_eventstream_t  *es;

    static ngx_str_t  vnd = ngx_string("application/vnd.amazon.eventstream");

    if (ctx->key->provider->service != RATEPOOL_SERVICE_INVOKE
        || r->headers_out.content_type.len < vnd.len
        || ngx_strncasecmp(r->headers_out.content_type.data, vnd.data,
                           vnd.len) != 0)
    {
        return NGX_OK;
    }

    es = ngx_palloc(r->pool, sizeof(ratepool_eventstream_t));
    buf = ngx_palloc(r->pool, RATEPOOL_FRAME_MAX);

    if (es == NULL || buf == NULL) {
        return NGX_ERROR;
    }

    ratepool_es_init(es, buf, RATEPOOL_FRAME_MAX);
    ctx->eventstream = es;

    ngx_str_set(&r->headers_out.content_type, "text/event-stream");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.charset.len = 0;

    ngx_http_clear_content_length(r);

    return NGX_OK;
}


/*
 * The event stream's bytes, as they come, into SSE events: the input is
 * consumed; *out gets an event's buffer for each whole frame (from
 * ctx->free where one is), and a broken stream ends with an error event.
 */

ngx_int_t
ngx_http_ratepool_cloud_sse(ngx_http_request_t *r,
    ngx_http_ratepool_ctx_t *ctx, ngx_chain_t *in, ngx_chain_t **out)
{
    ngx_buf_t                    *b;
    ngx_chain_t                  *cl;
    ratepool_eventstream_t       *es;
    ngx_http_ratepool_sse_out_t   o;

    static u_char  broken[] = "event: error\ndata: {\"type\":\"error\","
                              "\"error\":{\"type\":\"api_error\","
                              "\"message\":\"the provider's event stream "
                              "broke off\"}}\n\n";

    es = ctx->eventstream;

    *out = NULL;
    o.request = r;
    o.ctx = ctx;
    o.ll = out;

    for (cl = in; cl; cl = cl->next) {
        if (ngx_buf_in_memory(cl->buf) && !es->broken) {
            if (ratepool_es_feed(es, cl->buf->pos,
                                 cl->buf->last - cl->buf->pos,
                                 ngx_http_ratepool_frame, &o)
                != 0)
            {
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "ratepool: key \"%V\" sent an event stream "
                              "that does not parse, the stream ends there",
                              &ctx->key->name);

                b = ngx_http_ratepool_sse_buf(&o, sizeof(broken) - 1);
                if (b == NULL) {
                    return NGX_ERROR;
                }

                b->last = ngx_cpymem(b->last, broken, sizeof(broken) - 1);
            }
        }

        cl->buf->pos = cl->buf->last;

        if (cl->buf->last_buf && es->have && !es->broken) {
            /* the stream ended inside a frame */
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "ratepool: key \"%V\" ended its event stream "
                          "inside a frame", &ctx->key->name);

            es->broken = 1;

            b = ngx_http_ratepool_sse_buf(&o, sizeof(broken) - 1);
            if (b == NULL) {
                return NGX_ERROR;
            }

            b->last = ngx_cpymem(b->last, broken, sizeof(broken) - 1);
        }

        if (cl->buf->last_buf || cl->buf->flush) {
            b = ngx_http_ratepool_sse_buf(&o, 0);
            if (b == NULL) {
                return NGX_ERROR;
            }

            b->last_buf = cl->buf->last_buf;
            b->flush = 1;
        }
    }

    return NGX_OK;
}


static int
ngx_http_ratepool_frame(void *data, int kind, const u_char *type,
    size_t type_len, const u_char *payload, size_t len)
{
    ngx_http_ratepool_sse_out_t *o = data;

    long          n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl, **ll;

    ll = o->ll;

    b = ngx_http_ratepool_sse_buf(o, len + RATEPOOL_ES_SSE_EXTRA);
    if (b == NULL) {
        return -1;
    }

    n = ratepool_es_sse(kind, type, type_len, payload, len, b->last,
                        len + RATEPOOL_ES_SSE_EXTRA);

    if (n <= 0) {
        /* nothing for the client: the buffer goes back, unsent */
        cl = *ll;
        *ll = NULL;
        o->ll = ll;
        cl->next = o->ctx->free;
        o->ctx->free = cl;

        return n < 0 ? -1 : 0;
    }

    b->last += n;

    return 0;
}


/* an output buffer of at least size bytes, at the chain's end */

static ngx_buf_t *
ngx_http_ratepool_sse_buf(ngx_http_ratepool_sse_out_t *o, size_t size)
{
    ngx_chain_t  *cl;

    cl = ngx_http_ratepool_out_buf(o->request, o->ctx, size);
    if (cl == NULL) {
        return NULL;
    }

    *o->ll = cl;
    o->ll = &cl->next;

    return cl->buf;
}
