#!/usr/bin/perl

# Secrets: upstream keys and client gateway tokens appear in no log, no
# status output and no error page; the client's credentials never reach
# the provider, and each key goes out in its provider's own header.

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

*random_hex = \&Ratepool::Test::random_hex;

# a1 answers 429 once, d1 is refused, b1 serves; o1 is an OpenAI key
my %SECRET = map { $_ => 'sk-ant-mock-' . random_hex(16) } qw(a1 b1 d1 o1);
my %TOKEN = (
    backend => 'gw-backend-' . random_hex(16),
    tiny    => 'gw-tiny-' . random_hex(16),
    unknown => 'gw-unknown-' . random_hex(16),
    stray   => 'gw-stray-' . random_hex(16),
);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { map { $SECRET{$_} => { org => "org-$_", name => $_ } }
              keys %SECRET },
    orgs => { map { ("org-$_" => { rpm => 1000 }) } keys %SECRET },
});

$t->write_file("$_.key", "$SECRET{$_}\n") for qw(a1 d1 o1);

my %sha = map { $_ => sha256_hex($TOKEN{$_}) } qw(backend tiny);

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%%
                     key_file=%%TESTDIR%%/a1.key;
        ratepool_key b1 org=org-b server=127.0.0.1:%%PORT_1%% key=$SECRET{b1};
        ratepool_key d1 org=org-d server=127.0.0.1:%%PORT_1%%
                     key_file=%%TESTDIR%%/d1.key;
        keepalive 8;
    }

    upstream gpt {
        ratepool zone=llm;
        ratepool_key o1 org=org-o provider=openai
                     server=127.0.0.1:%%PORT_1%% key_file=%%TESTDIR%%/o1.key;
    }

    ratepool_workspace backend rpm=100;
    ratepool_workspace tiny rpm=1;
    ratepool_client backend sha256:$sha{backend};
    ratepool_client tiny sha256:$sha{tiny};

    log_format gateway '\$remote_addr [\$time_local] "\$request" \$status '
                       '\$body_bytes_sent "\$http_user_agent" '
                       'rt=\$request_time key=\$ratepool_key '
                       'ws=\$ratepool_workspace tries=\$ratepool_tries '
                       'upstream=\$upstream_addr ustatus=\$upstream_status';

    access_log %%TESTDIR%%/gateway.log gateway;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_2%%;

        location /v1/ {
            ratepool_pass http://gpt;
        }
    }
}
EOF

$t->run;

my @answers;    # everything the gateway said to clients

sub message {
    my ($port, @headers) = @_;

    my $r = $t->http(
        port    => $t->port($port),
        method  => 'POST',
        path    => '/v1/messages',
        headers => [ 'anthropic-version' => '2023-06-01',
                     'User-Agent' => 'secrets-test/1.0', @headers ],
        body    => { model => 'claude-sonnet-4-6', max_tokens => 50,
                     messages => [ { role => 'user', content => 'Hi' } ] },
    );
    push @answers, "$r->{raw_headers}\r\n\r\n$r->{body}";
    return $r;
}

sub error_type {
    return (eval { decode_json($_[0]{body}) } || {})->{error}{type} // '';
}

# traffic: a re-routed 429, a refused key, every way of sending a token

$mock->script($SECRET{a1}, [ { status => 429, retry_after => '30' } ]);
$mock->script($SECRET{d1}, [ { status => 401 } ], sticky => 1);

my @ok = map { message(0, 'x-api-key' => $TOKEN{backend})->{status} } 1 .. 3;
push @ok, message(0, Authorization => "Bearer $TOKEN{backend}")->{status};
push @ok, message(0, 'x-api-key' => $TOKEN{backend},
                     Authorization => "Bearer $TOKEN{backend}")->{status};
push @ok, message(0, 'x-api-key' => $TOKEN{stray},
                     Authorization => "Bearer $TOKEN{backend}")->{status};
push @ok, message(0, 'x-api-key' => $TOKEN{stray},
                     'x-api-key' => $TOKEN{backend})->{status};
is_deeply(\@ok, [ (200) x 7 ], 'clients are answered however they send '
    . 'the token, past a 429 and a refused key');

my $status = eval { decode_json($t->http(port => $t->port(0),
                                         path => '/ratepool/status')->{body}) };
my %key = map { $_->{name} => $_ } @{ $status->{pools}[0]{keys} || [] };
is($key{a1}{state}, 'cooling', 'a1 was re-routed from and cools down');
is($key{d1}{state}, 'dead', 'd1 was refused and is out');

my $r = message(0, 'x-api-key' => $TOKEN{unknown});
is($r->{status}, 401, 'an unknown token is refused');
is(error_type($r), 'authentication_error', 'with an authentication_error');

$r = message(0, Authorization => "Bearer $TOKEN{unknown}");
is($r->{status}, 401, 'an unknown bearer token is refused');

is(message(0, 'x-api-key' => $TOKEN{tiny})->{status}, 200,
    'the tiny workspace gets its one request a minute');
$r = message(0, 'x-api-key' => $TOKEN{tiny});
is($r->{status}, 429, 'and not a second');
is(error_type($r), 'rate_limit_error', 'with a rate_limit_error');

$r = message(2, 'x-api-key' => $TOKEN{backend},
                Authorization => "Bearer $TOKEN{backend}");
is($r->{status}, 200, 'the OpenAI pool answers too');

# what the provider received

my $log = $mock->log;
my %by_key;
push @{ $by_key{ $_->{key_name} // '?' } }, $_ for @$log;

for my $name (qw(a1 b1 d1)) {
    my @seen = @{ $by_key{$name} || [] };
    ok(@seen && !grep({ ($_->{headers}{'x-api-key'} // '') ne $SECRET{$name} }
                      @seen),
       "anthropic key $name is sent as x-api-key, alone");
    ok(!grep({ exists $_->{headers}{authorization} } @seen),
       "with no Authorization header next to $name");
}

my @openai = @{ $by_key{o1} || [] };
is(scalar @openai, 1, 'the OpenAI key was used once');
is($openai[0]{headers}{authorization}, "Bearer $SECRET{o1}",
    'an OpenAI key is sent as Authorization: Bearer');
ok(!exists $openai[0]{headers}{'x-api-key'},
    'with no x-api-key header, though the client sent one');
is(scalar(grep { ($_->{key_name} // '?') eq '?' } @$log), 0,
    'the provider never saw a credential it does not know');

my $upstream = JSON::PP->new->canonical->encode($log);
for my $name (sort keys %TOKEN) {
    ok(index($upstream, $TOKEN{$name}) < 0,
       "the $name client token never reached the provider");
}

# where a secret must not be

$status = $t->http(port => $t->port(0), path => '/ratepool/status')->{body};
my $fingerprint = substr(sha256_hex($SECRET{d1}), 0, 12);
like($status, qr/"fingerprint":"$fingerprint"/,
    'the status page shows a key by its fingerprint');

$t->stop;

my $access = $t->read_file('gateway.log');
like($access, qr/key=b1 ws=backend tries=\d/,
    'the access log names the key and the workspace');
like($t->error_log, qr/key "d1" .*$fingerprint/,
    'the error log names the refused key by name and fingerprint');

my %place = (
    'status output'      => $status,
    'access log'         => $access,
    'default access log' => $t->access_log,
    'answers to clients' => join("\n", @answers),
    'nginx stderr'       => $t->read_file('stderr.log'),
);

SKIP: {
    skip 'nginx itself logs request headers at debug level', 1
        if $ENV{RATEPOOL_DEBUG_LOG};
    $place{'error log'} = $t->error_log;
    pass('the error log is at info level, as operators run it');
}

my %secret = ((map { ("upstream key $_" => $SECRET{$_}) } keys %SECRET),
              (map { ("client token $_" => $TOKEN{$_}) } keys %TOKEN));

for my $where (sort keys %place) {
    my @leaks;
    for my $what (sort keys %secret) {
        # a truncated secret is a leak too: look for its random part
        my ($random) = $secret{$what} =~ /([0-9a-f]{32})$/;
        push @leaks, $what
            if index($place{$where}, substr($random, 0, 16)) >= 0;
    }
    ok(!@leaks, "no secret in the $where") or diag "found: @leaks";
}

$t->check_log;

done_testing;
