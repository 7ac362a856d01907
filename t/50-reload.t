#!/usr/bin/perl

# Reload: what the gateway learned lives in shared memory and survives
# "nginx -s reload": cooldowns, counters and uptime go on, and a reload
# with a new key puts that key to work.

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep);

use Ratepool::Test;

my $t = Ratepool::Test->new;

*random_hex = \&Ratepool::Test::random_hex;

my %SECRET = map { $_ => 'sk-ant-mock-' . random_hex(16) } qw(a1 b1 c1);
my $TOKEN = 'gw-reload-' . random_hex(16);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { map { $SECRET{$_} => { org => "org-$_", name => $_ } }
              keys %SECRET },
    orgs => { map { ("org-$_" => { rpm => 1000 }) } keys %SECRET },
});

$t->write_file("$_.key", "$SECRET{$_}\n") for keys %SECRET;

sub config {
    my ($size, @names) = @_ && $_[0] =~ /^\d/ ? @_ : ('1m', @_);
    my $keys = join '', map {
        "        ratepool_key $_ org=org-$_ server=127.0.0.1:%%PORT_1%%\n"
      . "                     key_file=%%TESTDIR%%/$_.key;\n" } @names;
    my $token_sha = sha256_hex($TOKEN);

    $t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:$size;

    upstream claude {
        ratepool zone=llm;
$keys
        keepalive 8;
    }

    ratepool_workspace backend rpm=100;
    ratepool_client backend sha256:$token_sha;

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
}

config(qw(a1 b1));
$t->run;

sub message { $t->messages(token => $TOKEN) }

sub status {
    my $s = $t->status;
    $s->{key} = Ratepool::Test::by_name($s->{pools}[0]{keys});
    $s->{org} = Ratepool::Test::by_name($s->{pools}[0]{orgs});
    return $s;
}

sub sent_with {
    my ($name) = @_;
    return scalar grep { ($_->{credential} // '') eq $SECRET{$name} }
                  @{ $mock->log };
}

# a1's org answers 429 with retry-after 30: the request goes on to b1

$mock->script($SECRET{a1}, [ { status => 429, retry_after => '30' } ],
              sticky => 1);

my @statuses = map { message()->{status} } 1 .. 2;
is_deeply(\@statuses, [ 200, 200 ],
    'the client never sees the 429 of a1, its request goes to b1');
is(sent_with('a1'), 1, 'a1 was asked once');

my $before = status();
is($before->{key}{a1}{state}, 'cooling', 'a1 cools down');
cmp_ok($before->{key}{a1}{cooldown_ms}, '>', 20000,
    'for about the 30 s the provider asked for');
cmp_ok($before->{org}{'org-a1'}{cooldown_ms}, '>', 20000,
    'and so does its org');
is($before->{key}{a1}{responses}{429}, 1, 'a1 counts its 429');
is($before->{totals}{rerouted}, 1, 'the request counts as re-routed');
is($before->{key}{b1}{state}, 'ok', 'b1 is ok');

# uptime must have started counting for "it goes on" to mean anything
sleep 0.2 while status()->{uptime_sec} < 1;
$before = status();

# a reload with the same configuration

ok($t->reload, 'nginx reloads');

my $after = status();
is($after->{key}{a1}{state}, 'cooling', 'a1 is still cooling after reload');
cmp_ok($after->{key}{a1}{cooldown_ms}, '>', 20000,
    'with what was left of its cooldown');
cmp_ok($after->{key}{a1}{cooldown_ms}, '<=', $before->{key}{a1}{cooldown_ms},
    'which was not restarted or extended');
is($after->{totals}{requests}, $before->{totals}{requests},
    'the request count survives the reload');
is($after->{totals}{rerouted}, 1, 'so does the re-routed count');
is_deeply($after->{key}{b1}{responses}, $before->{key}{b1}{responses},
    'and the per-key counters');
is($after->{workspaces}[0]{admitted}, $before->{workspaces}[0]{admitted},
    'and the workspace\'s');
cmp_ok($after->{uptime_sec}, '>=', $before->{uptime_sec},
    'uptime goes on from before the reload');

@statuses = map { message()->{status} } 1 .. 4;
is_deeply(\@statuses, [ (200) x 4 ], 'requests after the reload are answered');
is(sent_with('a1'), 1, 'and still avoid the cooling a1');
is(status()->{key}{b1}{sent}, $before->{key}{b1}{sent} + 4,
    'b1 takes them, counting on from before');

# a reload with a new key

config(qw(a1 b1 c1));
ok($t->reload, 'nginx reloads with a third key');

my $added = status();
ok($added->{key}{c1}, 'the status page lists the new key');
is($added->{key}{c1}{fingerprint}, substr(sha256_hex($SECRET{c1}), 0, 12),
    'by the fingerprint of its secret');
is($added->{key}{c1}{sent}, 0, 'which starts from zero');
is($added->{key}{a1}{state}, 'cooling', 'a1 is still cooling');
is($added->{totals}{requests}, $before->{totals}{requests} + 4,
    'the totals go on');

@statuses = map { message()->{status} } 1 .. 4;
is_deeply(\@statuses, [ (200) x 4 ], 'requests with the new key are answered');
cmp_ok(sent_with('c1'), '>', 0, 'the new key c1 is used');
is(sent_with('a1'), 1, 'a1 is still avoided');

my $last = status();
is($last->{key}{c1}{responses}{'2xx'}, sent_with('c1'),
    'c1 counts its answers');
is($last->{key}{b1}{sent} + $last->{key}{c1}{sent},
   $before->{key}{b1}{sent} + 8, 'b1 and c1 share the requests');

# a cooldown longer than a provider asks for (a retry-after of a date
# years ahead, kept as an hour) is ended by a reload; a shorter one goes on

$mock->script($SECRET{$_}, [ { status => 429,
                               retry_after => 'Thu, 01 Jan 2099 00:00:00 GMT',
                             } ])
    for qw(b1 c1);
is(message()->{status}, 429, 'b1 and c1 answer 429 until 2099, a1 cools');

my $far = status();
ok($far->{key}{b1}{cooldown_ms} > 3000000
   && $far->{key}{c1}{cooldown_ms} > 3000000,
   'b1 and c1 cool down for an hour, not until 2099');

ok($t->reload, 'nginx reloads');

my $cleared = status();
is_deeply([ map { $cleared->{key}{$_}{state} } qw(a1 b1 c1) ],
    [ 'cooling', 'ok', 'ok' ],
    'the hour-long cooldowns are over, a1\'s half minute goes on');
is(message()->{status}, 200, 'and requests are answered again');
like($t->error_log,
     qr/org "org-b1" was to cool down for \d+ s more, the reload ends it/,
     'the log says so');

# what the log says at each start and reload, and when state is lost
my @summary = $t->error_log
              =~ /ratepool: pool "claude" has 3 keys: ([^\n]*)/g;
ok(@summary >= 2, 'each reload logs what each pool serves');
my $fp = substr(sha256_hex($SECRET{c1}), 0, 12);
like($summary[-1] // '', qr/^a1 \(org-a1, anthropic, \w{12}\), b1 .* c1 \(org-c1, anthropic, $fp\)/,
     'its keys, with their orgs, providers and fingerprints');
like($t->error_log,
     qr/ratepool: zone "llm" serves 1 pools, 1 workspaces and 1 client tokens, its limits in this gateway's shared memory/,
     'and the zone\'s summary');
unlike($t->error_log, qr/made anew/, 'no state was lost so far');

config('2m', qw(a1 b1 c1));
ok($t->reload, 'nginx reloads with a larger zone');
like($t->error_log,
     qr/\[warn\].*ratepool zone "llm" is made anew, as its size changed from 1048576 to 2097152: its counts, cooldowns/,
     'the log warns that the zone\'s state is lost');
is(status()->{key}{a1}{state}, 'ok', 'as it is: a1 no longer cools');

$t->stop;
$t->check_log;

done_testing;
