#!/usr/bin/perl

# TLS to Redis, as managed Redis offerings require it: the real
# redis-server with only its TLS port open, certificates made here with
# openssl.  Gateways share limits over TLS (with AUTH inside it); a
# certificate that does not verify, or is for another name, or a Redis
# that wants a client certificate the gateway has not got, is a failed
# connection with a log line that says why, never plain text instead;
# with its client certificate the gateway is let in.

use strict;
use warnings;

use lib 't/lib';

use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;
use Ratepool::Tls;

my $t = Ratepool::Test->new;
my $tls = Ratepool::Tls->new($t, mock => 0);
my $dir = $t->testdir;

# a client certificate, by the CA Redis trusts
$tls->make_cert('client', 'ca', 'gateway', 'DNS:gateway', 'clientAuth');

my $KEY = 'sk-ant-mock-s1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-tls-' . Ratepool::Test::random_hex(8);
my $PASS = Ratepool::Test::random_hex(12);

my $mock = $t->start_mock(port => 1, log => 1);

my %server = (cert => "$dir/good.crt", key => "$dir/good.key",
              ca => "$dir/ca.crt");
my $open = $t->start_redis(password => $PASS, tls => { %server });
my $strict = $t->start_redis(tls => { %server, clients => 1,
    client_cert => "$dir/client.crt", client_key => "$dir/client.key" });

$t->write_file('redis.pass', "$PASS\n");

# each gateway its own nginx; all share one mock provider
sub gateway {
    my ($redis) = @_;
    my $g = Ratepool::Test->new;

    $g->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m $redis redis_timeout=500ms redis_lease=off;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-s rpm=1000;
        ratepool_key s1 org=org-s server=127.0.0.1:${\ $mock->port }
                     key=$KEY;
    }

    ratepool_workspace team rpm=3;
    ratepool_client team ${\ $g->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF
    $g->run;
    return $g;
}

sub store { $_[0]->status->{store} }

# wait until the gateway's store says up or down
sub settles {
    my ($g, $state) = @_;
    my $deadline = time + 5;
    sleep 0.1 while store($g)->{state} ne $state && time < $deadline;
    return store($g)->{state} eq $state;
}

my $pass = "redis_password_file=$dir/redis.pass";
my $ca = "redis_tls_ca=$dir/ca.crt";

# --- two gateways share limits over TLS --------------------------------------

my @pair = map {
    gateway("redis=rediss://127.0.0.1:${\ $open->port } $ca $pass")
} 1 .. 2;

ok(Ratepool::Test::redis_connected(@pair),
   'two gateways reach a TLS-only Redis, by address');
ok(settles($_, 'up'), 'it is up for each') for @pair;
is(store($pair[0])->{tls}, JSON::PP::true(), 'the status says: over TLS');

my $prom = $t->http(port => $pair[0]->port(0),
                    path => '/ratepool/status?format=prometheus')->{body};
like($prom, qr/^ratepool_redis_info\{server="127\.0\.0\.1:\d+",tls="true"\} 1$/m,
     'and so does Prometheus');

# the workspace's 3 requests a minute are the pair's
my @codes = map { $pair[$_ % 2]->messages(token => $TOKEN)->{status} }
            0 .. 3;
is(join(',', @codes), '200,200,200,429',
   'a workspace\'s rpm=3 holds across both, shared over TLS');
like($open->cli('KEYS', '*'), qr/ratepool:\{llm\}:w:team/,
     'Redis, over TLS, holds the workspace\'s bucket');

# --- a certificate that does not verify ------------------------------------

my $rogue = gateway("redis=rediss://127.0.0.1:${\ $open->port } "
                    . "redis_tls_ca=$dir/rogue-ca.crt $pass");
ok(settles($rogue, 'down'), 'a Redis whose certificate does not verify '
   . 'against redis_tls_ca= is down');
like($rogue->error_log,
     qr/redis at "127\.0\.0\.1:\d+" is down: its certificate does not verify: check redis_tls_ca= and redis_tls_name= \((?:unable to get local issuer certificate|self.signed certificate in certificate chain)\)/,
     'the log says why');
is($rogue->messages(token => $TOKEN)->{status}, 200,
   'requests go on as redis_fail=local says');

my $name = gateway("redis=rediss://127.0.0.1:${\ $open->port } $ca $pass "
                   . 'redis_tls_name=wrong.example');
ok(settles($name, 'down'), 'a certificate for another name is refused');
like($name->error_log,
     qr/is down: its certificate does not verify: check redis_tls_ca= and redis_tls_name= \(it is not for that name\)/,
     'and the log says so');

my $dns = gateway("redis=rediss://localhost:${\ $open->port } $ca $pass");
ok(settles($dns, 'up'), 'by name (SNI, and the name checked) it connects');

my $plain = gateway("redis=127.0.0.1:${\ $open->port } $pass");
ok(settles($plain, 'down'), 'plain text to the TLS port is no connection');

# --- a Redis that wants a client certificate -------------------------------

my $anon = gateway("redis=rediss://127.0.0.1:${\ $strict->port } $ca");
ok(settles($anon, 'down'), 'without a client certificate: down');
like($anon->error_log,
     qr/is down: (?:the TLS handshake failed|it ended the TLS connection before answering \(does it want a client certificate: redis_tls_cert=\?\))/,
     'the log says TLS failed, and asks about a client certificate');

my $cert = gateway("redis=rediss://127.0.0.1:${\ $strict->port } $ca "
                   . "redis_tls_cert=$dir/client.crt "
                   . "redis_tls_key=$dir/client.key");
ok(settles($cert, 'up'), 'with redis_tls_cert= and redis_tls_key=: up');
is($cert->messages(token => $TOKEN)->{status}, 200, 'and serving');

# --- nginx -t --------------------------------------------------------------

my $bad = Ratepool::Test->new;
$bad->write_config(<<"EOF");
%%TEST_GLOBALS%%
events {
}
http {
    ratepool_zone llm:1m redis=127.0.0.1:6379 redis_tls_ca=$dir/ca.crt;
}
EOF
my ($rc, $out) = $bad->nginx_test_config;
isnt($rc, 0, 'TLS parameters without TLS fail nginx -t');
like($out, qr/"redis_tls_\*" parameters need TLS: use "redis=rediss:\/\/HOST:PORT" or "redis_tls=on"/,
     'saying how to turn it on');

for my $g (@pair, $rogue, $name, $dns, $plain, $anon, $cert) {
    unlike($g->error_log, qr/\Q$PASS\E/, 'no password in the log');
}

$_->check_log for @pair, $dns, $cert;

done_testing;
