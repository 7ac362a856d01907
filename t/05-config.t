#!/usr/bin/perl

# A bad nginx.conf fails "nginx -t" with a message that names the
# directive or value at fault and says how to fix it, and never echoes
# a secret.

use strict;
use warnings;

use lib 't/lib';

use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $SECRET = 'sk-ant-secret-' . int(rand(1e9));
my $HASH = $t->token_hash('gw-token');

$t->write_file('good.key', "$SECRET\n");
$t->write_file('bad.key', "sk-ant with space\n");
$t->write_file('half.aws', "aws_access_key_id = AKIAEXAMPLE\n");

# each case: the http{} contents, and what nginx -t must say
my @cases = (
    [ 'a pool without a zone',
      "upstream p { ratepool zone=llm; ratepool_key k server=127.0.0.1:1 "
      . "key=$SECRET; }",
      qr/uses ratepool zone "llm", which is not declared; add "ratepool_zone llm:1m;" to the http block \(upstream in \S+nginx\.conf:\d+\)/ ],

    [ 'a pool naming an undeclared zone',
      "ratepool_zone llm:1m; upstream p { ratepool zone=other; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; }",
      qr/uses ratepool zone "other", which is not declared/ ],

    [ 'a zone that is too small',
      'ratepool_zone llm:4k;',
      qr/zone "llm:4k" is too small, use at least/ ],

    [ 'a zone without a size',
      'ratepool_zone llm;',
      qr/invalid zone "llm", use "name:size"/ ],

    [ 'ratepool after keepalive',
      "ratepool_zone llm:1m; upstream p { keepalive 8; ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; }",
      qr/"ratepool" directive must come first in the upstream block/ ],

    [ 'a pool with servers instead of keys',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "server 127.0.0.1:1; ratepool_key k server=127.0.0.1:1 "
      . "key=$SECRET; }",
      qr/upstream "p" is a ratepool pool: declare its keys with "ratepool_key", not "server" in \S+nginx\.conf:\d+/ ],

    [ 'a pool with no keys',
      'ratepool_zone llm:1m; upstream p { ratepool zone=llm; '
      . 'server 127.0.0.1:1; }',
      qr/upstream "p" has no keys, add "ratepool_key .* in \S+nginx\.conf:\d+/ ],

    [ 'a key without a secret',
      'ratepool_zone llm:1m; upstream p { ratepool zone=llm; '
      . 'ratepool_key k server=127.0.0.1:1; }',
      qr/key "k" has no secret, add "key_file=PATH"/ ],

    [ 'a key without a server',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k key=$SECRET; }",
      qr/key "k" has no server, add "server=api.anthropic.com:443"/ ],

    [ 'a key file that does not exist',
      'ratepool_zone llm:1m; upstream p { ratepool zone=llm; '
      . 'ratepool_key k server=127.0.0.1:1 key_file=%%TESTDIR%%/nope.key; }',
      qr/open\(\) ".*nope.key" failed/ ],

    [ 'a secret that cannot be sent in a header',
      'ratepool_zone llm:1m; upstream p { ratepool zone=llm; '
      . 'ratepool_key k server=127.0.0.1:1 key_file=%%TESTDIR%%/bad.key; }',
      qr/the secret of key "k" has a character that cannot be sent/ ],

    [ 'an unknown key parameter',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 kee=$SECRET; }",
      qr/invalid parameter 3 of key "k", use "org=", "provider="/ ],

    [ 'an unknown provider',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k provider=gemini server=127.0.0.1:1 key=$SECRET; }",
      qr/invalid provider "provider=gemini", use "provider=anthropic"/ ],

    [ 'a key declared twice',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; }",
      qr/key "k" is declared twice/ ],

    [ 'one key name for two secrets in two pools',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; } upstream q { "
      . "ratepool zone=llm; ratepool_key k server=127.0.0.1:1 key=other; }",
      qr/key "k" is declared in upstreams "p" and "q" with different secrets or orgs/ ],

    [ 'keepalive over keys of two hosts at one address',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key a server=localhost:1 key=$SECRET; "
      . "ratepool_key b server=127.0.0.1:1 key=$SECRET; keepalive 8; }",
      qr/keys "a" and "b" of upstream "p" reach different hosts at one address 127.0.0.1:1, and keepalive would reuse/ ],

    [ 'another balancer after ratepool',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key a server=127.0.0.1:1 key=$SECRET; least_conn; }",
      qr/upstream "p" has "ratepool" and another balancer; ratepool chooses the keys, remove the other one/ ],

    [ 'a zone in a pool',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key a server=127.0.0.1:1 key=$SECRET; zone p 64k; }",
      qr/upstream "p" is a ratepool pool: its state lives in the ratepool_zone, remove "zone" in \S+nginx\.conf:\d+/ ],

    [ 'one org with two sets of limits',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_org o rpm=50; ratepool_key a org=o server=127.0.0.1:1 "
      . "key=$SECRET; } upstream q { ratepool zone=llm; ratepool_org o "
      . "rpm=60; ratepool_key a org=o server=127.0.0.1:1 key=$SECRET; }",
      qr/org "o" has different limits in upstreams "p" and "q"/ ],

    [ 'one token for two workspaces',
      "ratepool_zone llm:1m; ratepool_workspace w; ratepool_workspace v; "
      . "ratepool_client w $HASH; ratepool_client v $HASH;",
      qr/one client token is given to workspaces "w" and "v"/ ],

    [ 'a pool named with odd characters',
      "ratepool_zone llm:1m; upstream p\\\"q { ratepool zone=llm; "
      . "ratepool_key a server=127.0.0.1:1 key=$SECRET; }",
      qr/"ratepool" directive needs an upstream name of letters/ ],

    [ 'a bad org limit',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_org o rpm=lots; ratepool_key k org=o server=127.0.0.1:1 "
      . "key=$SECRET; }",
      qr/invalid limit "rpm=lots", use a positive number per minute/ ],

    [ 'a workspace weight over 100',
      'ratepool_workspace w weight=1000;',
      qr/invalid limit "weight=1000", use a positive number, for example "rpm=200", "daily_tokens=5000000" or "daily_usd=25.50", and a weight of 1 to 100/ ],

    [ 'a pool name too long to keep',
      "ratepool_zone llm:1m; upstream " . ('p' x 65) . " { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; }",
      qr/"ratepool" directive needs an upstream name of up to 64 characters/ ],

    [ 'a queue that is not a number',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm queue=many; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; }",
      qr/invalid parameter "queue=many", use "queue=N" with the number of requests that may wait for the pool/ ],

    [ 'an overload time that is not one',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm overload=soon; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; }",
      qr/invalid parameter "overload=soon", use "overload=TIME" \(0 to 10m\) for how long a server that answered 529 or 503 ranks after the others/ ],

    [ 'an unknown parameter of ratepool',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm queue=5 "
      . "overload=1s slow=1; ratepool_key k server=127.0.0.1:1 key=$SECRET; }",
      qr/invalid parameter "slow=1", use "queue=N" or "overload=TIME"/ ],

    [ 'a Bedrock key without a region',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k provider=bedrock key=$SECRET; }",
      qr/key "k" of provider bedrock has no region, add "region=us-east-1"/ ],

    [ 'AWS credentials without a secret',
      'ratepool_zone llm:1m; upstream p { ratepool zone=llm; '
      . 'ratepool_key k provider=bedrock region=us-east-1 '
      . 'aws_key_file=%%TESTDIR%%/half.aws; }',
      qr/aws_key_file ".*half.aws" of key "k" needs "aws_access_key_id = \.\.\." and "aws_secret_access_key = \.\.\." lines/ ],

    [ 'AWS credentials for a key that is not Bedrock\'s',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 "
      . "aws_key_file=%%TESTDIR%%/good.key; }",
      qr/aws_key_file ".*good.key" of key "k" needs/ ],

    [ 'a model id that cannot go into JSON',
      'ratepool_model claude-sonnet-4-6 bedrock=us.anthropic."x";',
      qr/invalid model id in "bedrock=us.anthropic."x"", use one such as "bedrock=us.anthropic.claude-sonnet-4-6-v1:0"/ ],

    [ 'a Vertex key without a project',
      'ratepool_zone llm:1m; upstream p { ratepool zone=llm; '
      . 'ratepool_key k provider=vertex region=us-east5 '
      . 'service_account_file=%%TESTDIR%%/good.key; }',
      qr/key "k" of provider vertex needs "region=", "project=" and "service_account_file="/ ],

    [ 'a service account file that is no service account',
      'ratepool_zone llm:1m; upstream p { ratepool zone=llm; '
      . 'ratepool_key k provider=vertex region=us-east5 project=p '
      . 'service_account_file=%%TESTDIR%%/good.key; }',
      qr/service_account_file ".*good.key" of key "k" is not a service account's JSON key \(it needs "client_email", "private_key_id" and "private_key"\)/ ],

    [ 'a project for a key that is not Vertex\'s',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET project=p; }",
      qr/key "k" has "project=" or a service account, which only "provider=vertex" takes/ ],

    [ 'a beta flag that is no flag',
      'ratepool_bedrock_betas interleaved-thinking-2025-05-14 "a b";',
      qr/invalid beta flag "a b", use one such as "interleaved-thinking-2025-05-14"/ ],

    [ 'a model named twice',
      'ratepool_model m bedrock=a.b; ratepool_model m bedrock=c.d;',
      qr/model "m" is declared twice/ ],

    [ 'a model mapped to an unknown cloud',
      'ratepool_model m azure=x;',
      qr/invalid parameter "azure=x", use "bedrock=MODEL_ID" or "vertex=MODEL_ID"/ ],

    [ 'a fallback rank out of range',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET fallback=10; }",
      qr/invalid "fallback=10", use "fallback=N" from 0 \(preferred, the default\) to 9/ ],

    [ 'a Redis store with a bad address',
      'ratepool_zone llm:1m redis=127.0.0.1:notaport;',
      qr/invalid "redis=127.0.0.1:notaport": invalid port; use "redis=HOST:PORT", "redis=rediss:\/\/HOST:PORT" \(TLS\) or "redis=unix:\/path\/to\/redis.sock"/ ],

    [ 'a Redis store without a server',
      'ratepool_zone llm:1m redis_fail=closed;',
      qr/zone "llm" has Redis parameters but no server, add "redis=HOST:PORT"/ ],

    [ 'an unknown redis_fail policy',
      'ratepool_zone llm:1m redis=127.0.0.1 redis_fail=maybe;',
      qr/invalid parameter "redis_fail=maybe", use .*"redis_fail=local\|open\|closed"/ ],

    [ 'a Redis time budget of nothing',
      'ratepool_zone llm:1m redis=127.0.0.1 redis_timeout=0;',
      qr/invalid "redis_timeout=0", use a time from 1ms to 10s/ ],

    [ 'a Redis database out of range',
      'ratepool_zone llm:1m redis=127.0.0.1 redis_db=16;',
      qr/invalid "redis_db=16", use a database number of 0 to 15/ ],

    [ 'a Redis password file that is not there',
      'ratepool_zone llm:1m redis=127.0.0.1 '
      . 'redis_password_file=missing.pass;',
      qr/open\(\) ".*missing.pass" failed/ ],

    [ 'a wait that is not a time',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; } "
      . "server { location / { ratepool_wait forever; } }",
      qr/"ratepool_wait" directive invalid value/ ],

    [ 'a model pattern with a space in it',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_org o 'model=claude opus' rpm=5; ratepool_key k org=o "
      . "server=127.0.0.1:1 key=$SECRET; }",
      qr/invalid "model=claude opus", give a model name pattern of up to 64 characters where "\*" stands for any/ ],

    [ 'one org and model declared twice',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_org o model=claude-opus-* rpm=5; "
      . "ratepool_org o model=claude-opus-* rpm=6; ratepool_key k org=o "
      . "server=127.0.0.1:1 key=$SECRET; }",
      qr/org "o" is declared twice for model "claude-opus-\*"/ ],

    [ 'a cache reads switch that is neither on nor off',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_org o itpm_cache_reads=yes; ratepool_key k org=o "
      . "server=127.0.0.1:1 key=$SECRET; }",
      qr/invalid parameter "itpm_cache_reads=yes", use "model=", "rpm=", "itpm=", "otpm=", "tpm=" or "itpm_cache_reads="/ ],

    [ 'one limit for all tokens and one for input',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_org o tpm=1000 itpm=500; ratepool_key k org=o "
      . "server=127.0.0.1:1 key=$SECRET; }",
      qr/"tpm=" is one limit for input and output tokens together, give it or "itpm=" and "otpm=", not both/ ],

    [ 'an OpenAI org with an input tokens limit',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_org o itpm=500; ratepool_key k org=o provider=openai "
      . "server=127.0.0.1:1 key=$SECRET; }",
      qr/org "o" has one limit for input and output tokens \(its keys speak OpenAI's API or it has "tpm="\), use "tpm=" instead of "itpm=" and "otpm="/ ],

    [ 'an org whose keys speak two APIs',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key a org=o server=127.0.0.1:1 key=$SECRET; "
      . "ratepool_key b org=o provider=openai server=127.0.0.1:1 "
      . "key=$SECRET-2; }",
      qr/keys "a" and "b" of org "o" speak different APIs, give each provider's keys an org of their own/ ],

    [ 'an output reservation of nothing',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; } "
      . "server { location / { ratepool_output_reserve 0; } }",
      qr/value must be between 1 and 1000000/ ],

    [ 'a bad name',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k/1 server=127.0.0.1:1 key=$SECRET; }",
      qr/invalid name "k\/1", use up to 64 letters/ ],

    [ 'workspaces without a zone',
      "ratepool_workspace w;",
      qr/ratepool needs a shared memory zone, add "ratepool_zone/ ],

    [ 'a client hash that is not sha256',
      'ratepool_zone llm:1m; ratepool_workspace w; '
      . 'ratepool_client w md5:abc;',
      qr/invalid client token hash for workspace "w", use "sha256:"/ ],

    [ 'sentinels without the master\'s name',
      'ratepool_zone llm:1m redis_sentinel=127.0.0.1:26379;',
      qr/"redis_sentinel=" and "redis_master=" go together: the sentinels, and the name they know the master by/ ],

    [ 'sentinels and a Redis address both',
      'ratepool_zone llm:1m redis=127.0.0.1:6379 '
      . 'redis_sentinel=127.0.0.1:26379 redis_master=mymaster;',
      qr/zone "llm" has both "redis=" and "redis_sentinel=": the sentinels say where the master is, leave "redis=" out/ ],

    [ 'a sentinel that is not an address',
      'ratepool_zone llm:1m redis_sentinel=127.0.0.1:26379,:x '
      . 'redis_master=mymaster;',
      qr/invalid node ":x" in "redis_sentinel=127\.0\.0\.1:26379,:x": .*; use "redis_sentinel=HOST:PORT,HOST:PORT"/ ],

    [ 'a cluster and a Redis address both',
      'ratepool_zone llm:1m redis=127.0.0.1:6379 '
      . 'redis_cluster=127.0.0.1:7000,127.0.0.1:7001;',
      qr/"redis_cluster=" names the cluster's nodes alone: leave "redis=" and "redis_sentinel=" out/ ],

    [ 'a cluster without nodes',
      'ratepool_zone llm:1m redis_cluster=;',
      qr/"redis_cluster=" needs at least one node, such as "redis_cluster=HOST:PORT,HOST:PORT"/ ],

    [ 'a cluster with a database',
      'ratepool_zone llm:1m redis_cluster=127.0.0.1:7000 redis_db=3;',
      qr/a Redis Cluster has database 0 alone: leave "redis_db=" out/ ],

    [ 'a cluster node that is not an address',
      'ratepool_zone llm:1m redis_cluster=127.0.0.1:7000,,;',
      qr/invalid node "" in "redis_cluster=127\.0\.0\.1:7000,,": .*; use "redis_cluster=HOST:PORT,HOST:PORT"/ ],

    [ 'a client certificate without its key, for Redis',
      'ratepool_zone llm:1m redis=rediss://127.0.0.1:6379 '
      . 'redis_tls_cert=/etc/ssl/x.pem;',
      qr/"redis_tls_cert=" and "redis_tls_key=" go together: give both, or neither/ ],

    [ 'TLS to a unix socket',
      'ratepool_zone llm:1m redis=unix:/tmp/redis.sock redis_tls=on;',
      qr/TLS to redis at a unix socket is not supported, use "redis=rediss:\/\/HOST:PORT"/ ],

    [ 'a price without an output price',
      'ratepool_price claude-* input=3;',
      qr/model pattern "claude-\*" needs an input and an output price, such as "input=3 output=15"/ ],

    [ 'a price finer than a thousandth of a dollar',
      'ratepool_price claude-* input=3 output=1.2345;',
      qr/invalid price "output=1\.2345" of "claude-\*", use "input=", "output=", "cache_write=" or "cache_read=" and dollars per million tokens/ ],

    [ 'an unknown price',
      'ratepool_price claude-* input=3 output=15 batch=1;',
      qr/invalid price "batch=1" of "claude-\*"/ ],

    [ 'a pattern priced twice',
      'ratepool_price claude-* input=3 output=15; '
      . 'ratepool_price claude-* input=1 output=5;',
      qr/model pattern "claude-\*" is priced twice/ ],

    [ 'a price of a pattern with odd characters',
      'ratepool_price "claude sonnet" input=3 output=15;',
      qr/invalid model pattern "claude sonnet", use up to 64 characters of model names and "\*"/ ],

    [ 'a budget in dollars that is not one',
      'ratepool_zone llm:1m; ratepool_workspace w daily_usd=ten;',
      qr/invalid limit "daily_usd=ten", use a positive number/ ],

    [ 'a budget of no dollars',
      'ratepool_zone llm:1m; ratepool_workspace w monthly_usd=0;',
      qr/invalid limit "monthly_usd=0", use a positive number/ ],

    [ 'the example\'s placeholder hash left in',
      'ratepool_zone llm:1m; ratepool_workspace w; ratepool_client w sha256:'
      . ('0' x 64) . ';',
      qr/the client token hash for workspace "w" is a placeholder, one digit repeated; put in the hash of a real token: printf %s TOKEN \| sha256sum/ ],

    [ 'a client with an unknown parameter',
      "ratepool_zone llm:1m; ratepool_workspace w; "
      . "ratepool_client w $HASH nick=al;",
      qr/invalid parameter "nick=al" of a client of workspace "w", use "name=NAME"/ ],

    [ 'a client name with odd characters',
      "ratepool_zone llm:1m; ratepool_workspace w; "
      . "ratepool_client w $HASH name=al/ice;",
      qr/invalid name "al\/ice", use up to 64 letters/ ],

    [ 'one client name in two workspaces',
      "ratepool_zone llm:1m; ratepool_workspace w; ratepool_workspace v; "
      . "ratepool_client w $HASH name=ci; ratepool_client v "
      . $t->token_hash('gw-other') . " name=ci;",
      qr/client name "ci" is given in workspaces "w" and "v", a client's tokens are of one workspace/ ],

    [ 'a client of an unknown workspace',
      "ratepool_zone llm:1m; ratepool_client nobody $HASH;",
      qr/ratepool_client names unknown workspace "nobody", declare it with/ ],

    [ 'a workspace with an unknown budget',
      'ratepool_zone llm:1m; ratepool_workspace w rpd=5;',
      qr/invalid parameter "rpd=5", use "rpm="/ ],

    [ 'ratepool_pass to an upstream without ratepool',
      'ratepool_zone llm:1m; upstream p { server 127.0.0.1:1; } '
      . 'server { location / { ratepool_pass http://p; } }',
      qr/ratepool_pass "http:\/\/p" in .* needs an upstream "p" with the/ ],

    [ 'ratepool_pass without a scheme',
      'ratepool_zone llm:1m; server { location / { ratepool_pass p; } }',
      qr/invalid pool "p", use "https:\/\/NAME"/ ],

    [ 'ratepool_pass http:// to a key on port 443',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1 key=$SECRET; } server { "
      . "location / { ratepool_pass http://p; } }",
      qr/would send key "k" to port 443 without TLS, use "https:\/\/"/ ],

    [ 'a TLS parameter with http://',
      'ratepool_zone llm:1m; server { location / { '
      . 'ratepool_pass http://p ssl_verify=off; } }',
      qr/"ratepool_pass" directive takes TLS parameters only with "https:\/\/"/ ],

    [ 'an unknown ratepool_pass parameter',
      'ratepool_zone llm:1m; server { location / { '
      . 'ratepool_pass https://p verify=no; } }',
      qr/invalid parameter "verify=no", use "ssl_trusted_certificate=PATH" or "ssl_verify=off"/ ],

    [ 'ratepool_pass beside proxy_pass',
      "ratepool_zone llm:1m; upstream p { ratepool zone=llm; "
      . "ratepool_key k server=127.0.0.1:1 key=$SECRET; } server { "
      . "location / { proxy_pass http://p; ratepool_pass http://p; } }",
      qr/"ratepool_pass" directive cannot apply its proxy settings: remove/ ],
);

sub config {
    my ($http) = @_;

    return <<"EOF";
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    $http
}
EOF
}

for my $case (@cases) {
    my ($name, $http, $expect) = @$case;

    $t->write_config(config($http));

    my ($rc, $out) = $t->nginx_test_config;

    isnt($rc, 0, "nginx -t fails on $name");
    like($out, $expect, "and says what to do about $name");
    unlike($out, qr/\Q$SECRET\E/, "without echoing a secret, $name");
}

# and a complete pool passes

$t->write_config(config(<<"EOF"));
    ratepool_zone llm:1m;

    upstream p {
        ratepool zone=llm;
        ratepool_org o rpm=50 itpm=30000 otpm=8000;
        ratepool_key k org=o server=127.0.0.1:1
                     key_file=%%TESTDIR%%/good.key;
        ratepool_key j provider=openai server=127.0.0.1:2 key=$SECRET;
        keepalive 8;
    }

    upstream batch {
        ratepool zone=llm;
        ratepool_key k org=o server=127.0.0.1:1
                     key_file=%%TESTDIR%%/good.key;
    }

    ratepool_client w $HASH;
    ratepool_workspace w rpm=10;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location / {
            ratepool_pass https://p;
            proxy_read_timeout 600s;
        }

        location = /status {
            ratepool_status;
        }
    }
EOF

my ($rc, $out) = $t->nginx_test_config;
is($rc, 0, 'a complete pool passes nginx -t') or diag $out;

done_testing;
